//! What travels: user [`Value`]s and their binary codec, the control frames between peers and
//! the gateway, and the records on shared-memory lanes.

pub mod codec;
pub mod frame;
pub mod record;
pub mod stream;
pub mod value;

pub use value::{Map, Value};

#[cfg(test)]
mod tests;
