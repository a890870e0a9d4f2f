//! # knit — desktop interop over shared memory
//!
//! Apps on one desktop call each other's **methods** with io.Connect's semantics (targets,
//! waits, timeouts, multi-server aggregation), discover each other, and notice when one dies —
//! with the data travelling over lock-free rings in shared memory directly between the two
//! processes, not through a broker.
//!
//! The pieces, bottom up:
//!
//! * [`ring`] — SPSC rings of variable-length records, written once over a memory abstraction
//!   and model-checked with loom; [`wait`] — the doorbell (an eventcount over a shared futex)
//!   and wait strategies; [`shm`] — sealed memfd segments with a versioned header;
//! * [`wire`] — knit's [`Value`], its binary codec, control frames and lane records;
//! * [`model`] — io.Connect's rules as pure functions (targets, result aggregation);
//! * [`gateway`] — the control plane: identity, discovery, lane brokering, liveness;
//! * [`client`] — the Rust API;
//! * [`bridge`] — the WebSocket bridge that lets web apps (io.Connect / Glue42 clients, GW3)
//!   join as ordinary peers.
//!
//! A complete round trip, with an embedded gateway:
//!
//! ```
//! use knit::client::{Client, InvokeOptions};
//! use knit::gateway::{Gateway, GatewayConfig};
//! use knit::Value;
//!
//! let dir = std::env::temp_dir().join(format!("knit-doc-{}", std::process::id()));
//! let gw = Gateway::bind(GatewayConfig::new(dir.join("gw.sock")))?.spawn()?;
//!
//! let server = Client::builder("calc").socket(gw.socket_path()).connect()?;
//! server.register("Sum", |call| {
//!     let a = call.args.get("a").and_then(Value::as_i64).unwrap_or(0);
//!     let b = call.args.get("b").and_then(Value::as_i64).unwrap_or(0);
//!     Ok(Value::from(a + b))
//! })?;
//!
//! let client = Client::builder("app").socket(gw.socket_path()).connect()?;
//! let args = Value::object([("a", Value::from(40)), ("b", Value::from(2))]);
//! let result = client.invoke("sum", args, &InvokeOptions::default())?;
//! assert_eq!(result.returned, Value::from(42));
//! assert_eq!(result.executed_by.unwrap().application, "calc");
//! # drop((client, server)); gw.shutdown(); let _ = std::fs::remove_dir_all(dir);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub(crate) mod sync;

pub mod ring;
pub mod store;
pub mod wait;

#[cfg(not(knit_loom))]
pub mod bridge;
#[cfg(not(knit_loom))]
pub mod client;
#[cfg(not(knit_loom))]
pub mod control;
#[cfg(not(knit_loom))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(not(knit_loom))]
pub mod gateway;
#[cfg(not(knit_loom))]
pub mod keeper;
#[cfg(not(knit_loom))]
pub mod log;
#[cfg(not(knit_loom))]
pub mod model;
#[cfg(not(knit_loom))]
pub mod shm;
#[cfg(not(knit_loom))]
pub mod status;
#[cfg(not(knit_loom))]
pub mod sys;
#[cfg(not(knit_loom))]
pub mod wire;

#[cfg(not(knit_loom))]
pub use status::Status;
#[cfg(not(knit_loom))]
pub use wire::Value;
