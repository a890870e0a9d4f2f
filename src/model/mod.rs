//! io.Connect's rules as pure functions, with no I/O: which servers a target selects, how the
//! outcomes of several servers aggregate. The client, the gateway, the CLI and the bridge all
//! use these, so each rule exists once. (Contexts, routing keys and the rest join here with the
//! issues that bring them.)

pub mod bus;
pub mod context;
pub mod invoke;
pub mod policy;
pub mod target;

pub use invoke::{CallFailure, FailureKind, InvocationResult, ReturnValue};
pub use target::{InstanceFilter, Target};
