//! Calls `Examples.Price` for a symbol (default VOD.L) and prints the invocation result as
//! JSON. Exits non-zero when the call fails.

use knit::client::{Client, InvokeOptions};
use knit::Value;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let symbol = std::env::args().nth(1).unwrap_or_else(|| "VOD.L".into());
    let client = Client::connect("price-client-rust")?;
    let opts = InvokeOptions {
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let args = Value::object([("symbol", Value::from(symbol))]);
    let result = client.invoke("Examples.Price", args, &opts)?;
    println!("{}", result.to_value().to_json_string());
    client.close();
    Ok(())
}
