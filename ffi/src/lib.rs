//! knit's C ABI: `libknit.so` / `libknit.a`, declared in `bindings/c/include/knit.h` (generated
//! by cbindgen from this crate and committed; a test fails when it is stale).
//!
//! The contract — names, ownership, NULL rules, threading, poll mode — is written down in
//! `ffi/README.md`; DESIGN §5 fixes the core set. In short:
//!
//! * every function returns a [`knit_status_t`] (`KNIT_OK` = 0, errors > 0, from knit's one
//!   status table) except the string look-ups and the `*_free` functions;
//! * handles (`knit_client_t*`, `knit_reply_t*`) are checked tokens, not pointers: NULL, garbage,
//!   closed or already-answered handles give a status, never a crash;
//! * values cross as UTF-8 JSON text; strings and buffers knit returns are freed with
//!   [`knit_string_free`] / [`knit_bytes_free`];
//! * no panic crosses the boundary: each entry point runs under `catch_unwind` and reports
//!   `KNIT_INTERNAL`;
//! * callbacks run on the client's dispatcher thread, or inside [`knit_client_poll`] for a
//!   client connected with [`KNIT_CONNECT_POLL`].

#![allow(non_camel_case_types)]
#![warn(missing_debug_implementations)]

mod bus;
mod channels;
mod client;
mod contexts;
mod events;
mod gate;
mod handle;
mod interop;
mod status;
mod streams;
mod strings;
mod subscription;

pub use bus::*;
pub use channels::*;
pub use client::*;
pub use contexts::*;
pub use events::*;
pub use interop::*;
pub use status::*;
pub use streams::*;
pub use strings::{knit_bytes_free, knit_string_free};
pub use subscription::*;
