//! Invocation results and how the outcomes of several servers aggregate (features.md §3.4).

use crate::status::Status;
use crate::wire::frame::Instance;
use crate::wire::Value;
use std::sync::Arc;

/// Why one server's part of a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The method returned an error (or its handler panicked).
    Remote,
    /// No reply within the timeout.
    Timeout,
    /// The server left before answering.
    PeerLeft,
    /// The call could not be delivered (lane refused, payload too large, connection lost).
    Delivery(Status),
}

impl FailureKind {
    /// The status this failure maps to.
    pub fn status(self) -> Status {
        match self {
            FailureKind::Remote => Status::MethodFailed,
            FailureKind::Timeout => Status::Timeout,
            FailureKind::PeerLeft => Status::PeerLeft,
            FailureKind::Delivery(s) => s,
        }
    }
}

/// One server's failure.
#[derive(Debug, Clone, PartialEq)]
pub struct CallFailure {
    pub executed_by: Arc<Instance>,
    pub message: String,
    /// Error context supplied by the server, if any.
    pub context: Option<Value>,
    pub kind: FailureKind,
}

/// One server's success.
#[derive(Debug, Clone, PartialEq)]
pub struct ReturnValue {
    pub executed_by: Arc<Instance>,
    pub returned: Value,
}

/// The io.Connect-shaped result of an invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct InvocationResult {
    /// The method name as invoked.
    pub method: String,
    /// The arguments as sent.
    pub called_with: Value,
    /// The first outcome's value (in target order), or `Null` if it failed.
    pub returned: Value,
    /// The first outcome's server.
    pub executed_by: Option<Arc<Instance>>,
    /// 0 when the first outcome succeeded, 1 when it failed.
    pub status: i32,
    /// The first outcome's error message, empty on success.
    pub message: String,
    /// Every success, when several servers were called.
    pub all_return_values: Vec<ReturnValue>,
    /// Every failure, when several servers were called.
    pub all_errors: Vec<CallFailure>,
    /// Whether several servers were called.
    pub multi: bool,
}

impl InvocationResult {
    /// Aggregates per-server outcomes given in target order. `Err` (with the same shape) when
    /// every server failed; `Ok` when at least one succeeded.
    #[allow(clippy::result_large_err)] // both arms are the same, full result
    pub fn aggregate(
        method: &str,
        called_with: Value,
        outcomes: Vec<Result<ReturnValue, CallFailure>>,
    ) -> Result<InvocationResult, InvocationResult> {
        let multi = outcomes.len() > 1;
        if !multi {
            let mut outcomes = outcomes.into_iter();
            return match outcomes.next() {
                Some(o) => Self::aggregate_one(method, called_with, o),
                None => Err(Self::empty(method, called_with, false)),
            };
        }
        let mut r = Self::empty(method, called_with, true);
        match outcomes.first() {
            Some(Ok(v)) => {
                r.returned = v.returned.clone();
                r.executed_by = Some(v.executed_by.clone());
            }
            Some(Err(e)) => {
                r.status = 1;
                r.message = e.message.clone();
                r.executed_by = Some(e.executed_by.clone());
                r.returned = e.context.clone().unwrap_or(Value::Null);
            }
            None => {}
        }
        for o in outcomes {
            match o {
                Ok(v) => r.all_return_values.push(v),
                Err(e) => r.all_errors.push(e),
            }
        }
        if r.all_return_values.is_empty() {
            Err(r)
        } else {
            Ok(r)
        }
    }

    /// [`InvocationResult::aggregate`] for one server's outcome, without a list.
    #[allow(clippy::result_large_err)] // both arms are the same, full result
    pub fn aggregate_one(
        method: &str,
        called_with: Value,
        outcome: Result<ReturnValue, CallFailure>,
    ) -> Result<InvocationResult, InvocationResult> {
        let mut r = Self::empty(method, called_with, false);
        match outcome {
            Ok(v) => {
                r.returned = v.returned;
                r.executed_by = Some(v.executed_by);
                Ok(r)
            }
            Err(e) => {
                r.status = 1;
                r.message = e.message.clone();
                r.executed_by = Some(e.executed_by.clone());
                r.returned = e.context.clone().unwrap_or(Value::Null);
                r.all_errors.push(e);
                Err(r)
            }
        }
    }

    /// No outcome yet.
    fn empty(method: &str, called_with: Value, multi: bool) -> InvocationResult {
        InvocationResult {
            method: method.to_string(),
            called_with,
            returned: Value::Null,
            executed_by: None,
            status: 0,
            message: String::new(),
            all_return_values: Vec::new(),
            all_errors: Vec::new(),
            multi,
        }
    }

    /// The status of a failed invocation (every server failed): `Timeout` when every failure
    /// was a timeout, the single failure's status when there was one server, else
    /// `MethodFailed`.
    pub fn failure_status(&self) -> Status {
        if !self.all_errors.is_empty()
            && self
                .all_errors
                .iter()
                .all(|e| e.kind == FailureKind::Timeout)
        {
            return Status::Timeout;
        }
        match self.all_errors.as_slice() {
            [one] => one.kind.status(),
            _ => Status::MethodFailed,
        }
    }

    /// The JSON shape `knit invoke` prints: `{method, called_with, returned, executed_by,
    /// status, message}` plus `all_return_values` and `all_errors` when several servers were
    /// called.
    pub fn to_value(&self) -> Value {
        let mut m = crate::wire::Map::new();
        m.insert("method".into(), Value::from(self.method.as_str()));
        m.insert("called_with".into(), self.called_with.clone());
        m.insert("returned".into(), self.returned.clone());
        m.insert(
            "executed_by".into(),
            self.executed_by
                .as_deref()
                .map(Instance::to_value)
                .unwrap_or(Value::Null),
        );
        m.insert("status".into(), Value::from(self.status));
        m.insert("message".into(), Value::from(self.message.as_str()));
        if self.multi {
            let rv = self
                .all_return_values
                .iter()
                .map(|v| {
                    Value::object([
                        ("executed_by", v.executed_by.to_value()),
                        ("returned", v.returned.clone()),
                        ("method", Value::from(self.method.as_str())),
                        ("called_with", self.called_with.clone()),
                        ("status", Value::from(0)),
                        ("message", Value::from("")),
                    ])
                })
                .collect();
            let errs = self
                .all_errors
                .iter()
                .map(|e| {
                    Value::object([
                        ("executed_by", e.executed_by.to_value()),
                        ("called_with", self.called_with.clone()),
                        ("name", Value::from(self.method.as_str())),
                        ("message", Value::from(e.message.as_str())),
                    ])
                })
                .collect();
            m.insert("all_return_values".into(), Value::Array(rv));
            m.insert("all_errors".into(), Value::Array(errs));
        }
        Value::Map(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::PeerId;

    fn inst(id: u64) -> Instance {
        Instance {
            application: format!("app{id}"),
            instance: format!("i-{id}"),
            pid: 1,
            user: "u".into(),
            machine: "m".into(),
            peer_id: PeerId(id),
        }
    }
    fn ok(id: u64, v: i64) -> Result<ReturnValue, CallFailure> {
        Ok(ReturnValue {
            executed_by: Arc::new(inst(id)),
            returned: Value::from(v),
        })
    }
    fn err(id: u64, kind: FailureKind) -> Result<ReturnValue, CallFailure> {
        Err(CallFailure {
            executed_by: Arc::new(inst(id)),
            message: format!("e{id}"),
            context: None,
            kind,
        })
    }

    #[test]
    fn first_outcome_sets_the_top_level_even_when_it_failed() {
        let r = InvocationResult::aggregate(
            "m",
            Value::Null,
            vec![err(1, FailureKind::Remote), ok(2, 7)],
        )
        .unwrap();
        assert_eq!(r.status, 1);
        assert_eq!(r.message, "e1");
        assert_eq!(r.executed_by.as_ref().unwrap().peer_id, PeerId(1));
        assert_eq!(r.all_return_values.len(), 1);
        assert_eq!(r.all_errors.len(), 1);
        let v = r.to_value();
        assert!(v.get("all_return_values").is_some());
    }

    #[test]
    fn fails_only_when_every_server_failed() {
        let r = InvocationResult::aggregate(
            "m",
            Value::Null,
            vec![err(1, FailureKind::Timeout), err(2, FailureKind::Timeout)],
        )
        .unwrap_err();
        assert_eq!(r.failure_status(), Status::Timeout);
        let r = InvocationResult::aggregate(
            "m",
            Value::Null,
            vec![err(1, FailureKind::Timeout), err(2, FailureKind::PeerLeft)],
        )
        .unwrap_err();
        assert_eq!(r.failure_status(), Status::MethodFailed);
        let r = InvocationResult::aggregate("m", Value::Null, vec![err(1, FailureKind::PeerLeft)])
            .unwrap_err();
        assert_eq!(r.failure_status(), Status::PeerLeft);
    }

    #[test]
    fn single_server_output_has_no_aggregate_lists() {
        let r = InvocationResult::aggregate("m", Value::from(1), vec![ok(1, 2)]).unwrap();
        let v = r.to_value();
        assert_eq!(v.get("returned"), Some(&Value::from(2)));
        assert!(v.get("all_errors").is_none());
        assert_eq!(
            v.get("executed_by").unwrap().get("peerId"),
            Some(&Value::from("p-1"))
        );
    }
}
