//! Follows a shared context (the first argument) and prints each version it sees; exits once
//! the context says `"done": true`, printing its final value (or fails after 20 s).

use knit::client::Client;
use knit::Value;
use std::sync::mpsc;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "examples.instrument".into());
    let client = Client::connect("context-follower-rust")?;
    let (tx, rx) = mpsc::channel();
    let _sub = client.contexts().subscribe(&name, move |u| {
        println!("version {}: {}", u.version, u.delta.to_json_string());
        if u.data.get("done") == Some(&Value::from(true)) {
            let _ = tx.send(u.data.to_json_string());
        }
    })?;
    println!("following {name}");
    let last = rx.recv_timeout(Duration::from_secs(20))?;
    println!("followed {last}");
    client.close();
    Ok(())
}
