//! Writes a shared context step by step: a first value, five updates of `seq`, then a last
//! update that removes `scratch` and sets `done`. The context's name is the first argument.

use knit::client::Client;
use knit::Value;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "examples.instrument".into());
    let client = Client::connect("context-writer-rust")?;
    let ctx = client.contexts();
    ctx.set(
        &name,
        Value::object([
            ("symbol", Value::from("VOD.L")),
            ("writer", Value::from("rust")),
            ("seq", Value::from(0)),
            ("scratch", Value::from(true)),
        ]),
    )?;
    for seq in 1..=5 {
        ctx.update(&name, Value::object([("seq", Value::from(seq))]))?;
    }
    let last = Value::object([("scratch", Value::Null), ("done", Value::from(true))]);
    let version = ctx.update(&name, last)?;
    println!("wrote {name} up to version {version}");
    client.close();
    Ok(())
}
