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

/// The longest name (application, instance, method, stream, topic, context), in bytes: the
/// gateway's `Limits::max_name_len` by default. Client libraries check it before asking, so a
/// name that could never be registered, subscribed to or created is refused at once.
pub const MAX_NAME_LEN: usize = 1024;

/// `Err` with the message when `name` (a `what`: "method name", "topic", …) is longer than
/// `max` bytes. The message names the limit and the size, not the name (which may be
/// megabytes).
pub fn check_name_len(what: &str, name: &str, max: usize) -> Result<(), String> {
    if name.len() > max {
        return Err(format!(
            "{what} must be at most {max} bytes, not {}",
            name.len()
        ));
    }
    Ok(())
}

/// At most the first 200 characters of a name, then `…`: what an error message repeats of a
/// name it did not check.
pub fn clip_name(name: &str) -> std::borrow::Cow<'_, str> {
    match name.char_indices().nth(200) {
        None => name.into(),
        Some((end, _)) => format!("{}…", &name[..end]).into(),
    }
}

/// `Err` with the message when `name` cannot name a context: empty (io.Connect's words) or
/// longer than `max` bytes. One check for every context operation, native or web, so one
/// problem gets one answer (`BAD_INPUT`).
pub fn check_context_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("Please provide the name as a non-empty string!".into());
    }
    check_name_len("context name", name, max)
}

/// `Err` with the message when no method could have this name (the gateway registers
/// 1..=[`MAX_NAME_LEN`] bytes): io.Connect's words for an empty one. Invoking or waiting for
/// such a name is refused at once rather than waited out.
pub fn check_method_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("The provided 'method' argument is invalid.".into());
    }
    check_name_len("method name", name, MAX_NAME_LEN)
}
