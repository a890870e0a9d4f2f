//! Serves the method `Examples.Price`: it answers `{request, bid, ask, server}` to any request.
//! Prints one line once it serves, then serves until its standard input closes.
//! The gateway is `$KNIT_GATEWAY` (else the per-user default).

use knit::client::Client;
use knit::Value;
use std::io::Read;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect("price-server-rust")?;
    client.register("Examples.Price", |call| {
        Ok(Value::object([
            ("request", call.args.clone()),
            ("bid", Value::from(100.25)),
            ("ask", Value::from(100.75)),
            ("server", Value::from("rust")),
        ]))
    })?;
    println!("price-server (rust) ready");
    // Serve until the standard input closes (callbacks run on knit's dispatcher thread).
    std::io::stdin().read_to_end(&mut Vec::new())?;
    client.close();
    Ok(())
}
