//! Comparing a shadow's response with the primary's (`[shadow] compare`, `numeric_tolerance`,
//! `ignore`).
//!
//! The status is compared first; a different status is the only difference reported. Then the
//! body: as JSON when it can be read as JSON (key order and whitespace never matter, numbers
//! are equal within the tolerance, members at an `ignore` pointer are left out), as bytes
//! otherwise. With `compare` set only the values at those JSON pointers are compared, and a
//! body that is not JSON is a mismatch of the whole body.
//!
//! Reported values are bounded, so a list of recent mismatches stays small whatever the
//! bodies' size: a value whose compact JSON is longer than [`MAX_VALUE_CHARS`] characters is
//! reported as a string of its first [`MAX_VALUE_CHARS`] characters.

use std::io;

use serde_json::{Map, Number, Value};

/// Longest value, in characters of compact JSON (or of text, for a body that is not JSON),
/// that a [`FieldDiff`] carries whole; longer ones are cut to this many characters.
pub const MAX_VALUE_CHARS: usize = 200;

/// How responses are compared (from `[shadow] compare` / `numeric_tolerance` / `ignore`).
#[derive(Debug, Clone, PartialEq)]
pub struct CompareSpec {
    /// JSON pointers whose values are compared; empty compares the whole body.
    pub compare: Vec<String>,
    /// Largest `|a - b|` for two numbers to count as equal.
    pub numeric_tolerance: f64,
    /// JSON pointers whose values (and everything under them) are never compared.
    pub ignore: Vec<String>,
}

/// One differing field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDiff {
    /// The pointer from `compare`, or `"status"`, or `"body"`.
    pub field: String,
    /// The primary's value (bounded: see [`MAX_VALUE_CHARS`]).
    pub primary: Value,
    /// The shadow's value (bounded: see [`MAX_VALUE_CHARS`]).
    pub shadow: Value,
}

/// The comparison's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every compared field is equal.
    Match,
    /// The fields that differ, in the order they were compared.
    Mismatch(Vec<FieldDiff>),
}

impl Verdict {
    /// Whether the responses matched.
    pub fn is_match(&self) -> bool {
        matches!(self, Verdict::Match)
    }
}

impl CompareSpec {
    /// Validates the pointers (each must be `""` or start with `"/"`, and every `~` in it must
    /// be the escape `~0` or `~1`) and the tolerance (a number, not negative): `Err(message)`
    /// naming the bad one.
    pub fn new(
        compare: Vec<String>,
        numeric_tolerance: f64,
        ignore: Vec<String>,
    ) -> Result<Self, String> {
        for (list, pointers) in [("compare", &compare), ("ignore", &ignore)] {
            for p in pointers {
                if tokens(p).is_none() {
                    return Err(format!(
                        "{list}: {p:?} is not a JSON pointer (\"\" or \"/\"-separated tokens, \
                         with \"~\" written \"~0\" and \"/\" written \"~1\")"
                    ));
                }
            }
        }
        if numeric_tolerance.is_nan() || numeric_tolerance < 0.0 {
            return Err(format!(
                "numeric_tolerance: {numeric_tolerance} must be a number >= 0"
            ));
        }
        Ok(CompareSpec {
            compare,
            numeric_tolerance,
            ignore,
        })
    }

    /// Compares status then body. A different status is a mismatch of field `"status"` (the
    /// values as JSON numbers) and nothing else.
    ///
    /// With `compare` empty, the whole body: if both bodies parse as JSON they are compared as
    /// JSON values, with the tolerance and without the `ignore` pointers (so key order and
    /// whitespace do not matter); otherwise byte for byte. Either way a difference is field
    /// `"body"`: the JSON values without the ignored members, or the bodies as text (lossy
    /// UTF-8).
    ///
    /// With `compare` set, both bodies must parse as JSON (else field `"body"`, both bodies as
    /// text); for each pointer, the values at it (missing = `null`) must be equal: numbers
    /// within the tolerance (`|a - b| <= numeric_tolerance`), arrays and objects member by
    /// member with the same tolerance, others by equality. A pointer at or under an `ignore`
    /// pointer is skipped, and ignored members under a compared pointer are left out.
    ///
    /// A pointer that is not valid (a spec not built by [`CompareSpec::new`]) addresses
    /// nothing.
    pub fn compare(
        &self,
        primary_status: u16,
        primary: &[u8],
        shadow_status: u16,
        shadow: &[u8],
    ) -> Verdict {
        if primary_status != shadow_status {
            return Verdict::Mismatch(vec![FieldDiff {
                field: "status".to_owned(),
                primary: Value::from(primary_status),
                shadow: Value::from(shadow_status),
            }]);
        }
        let ignore: Vec<Vec<String>> = self.ignore.iter().filter_map(|p| tokens(p)).collect();
        let tol = self.numeric_tolerance;
        let parsed = (
            serde_json::from_slice::<Value>(primary),
            serde_json::from_slice::<Value>(shadow),
        );
        if self.compare.is_empty() {
            return match parsed {
                (Ok(a), Ok(b)) => {
                    let ignored: Vec<&[String]> = ignore.iter().map(Vec::as_slice).collect();
                    if same(&a, &b, tol, &ignored) {
                        Verdict::Match
                    } else {
                        Verdict::Mismatch(vec![FieldDiff {
                            field: "body".to_owned(),
                            primary: reported(&a, &ignored),
                            shadow: reported(&b, &ignored),
                        }])
                    }
                }
                _ if primary == shadow => Verdict::Match,
                _ => Verdict::Mismatch(vec![body_as_text(primary, shadow)]),
            };
        }
        let (Ok(a), Ok(b)) = parsed else {
            return Verdict::Mismatch(vec![body_as_text(primary, shadow)]);
        };
        let null = Value::Null;
        let mut diffs = Vec::new();
        for pointer in &self.compare {
            let Some(path) = tokens(pointer) else {
                continue;
            };
            // The ignore pointers that reach below this one, relative to it.
            let mut ignored: Vec<&[String]> = Vec::new();
            let mut skipped = false;
            for i in &ignore {
                if path.starts_with(i) {
                    skipped = true;
                    break;
                }
                if i.starts_with(&path) {
                    ignored.push(&i[path.len()..]);
                }
            }
            if skipped {
                continue;
            }
            let x = resolve(&a, &path).unwrap_or(&null);
            let y = resolve(&b, &path).unwrap_or(&null);
            if !same(x, y, tol, &ignored) {
                diffs.push(FieldDiff {
                    field: pointer.clone(),
                    primary: reported(x, &ignored),
                    shadow: reported(y, &ignored),
                });
            }
        }
        if diffs.is_empty() {
            Verdict::Match
        } else {
            Verdict::Mismatch(diffs)
        }
    }
}

/// Fields (pointers from `compare`, or `"body"`, or `"status"`) that differ between two
/// responses of the same model to the same request: noise, not a difference between models.
/// The same rules as [`CompareSpec::compare`]; returns the fields that differ, in its order.
pub fn noisy_fields(
    spec: &CompareSpec,
    status_a: u16,
    a: &[u8],
    status_b: u16,
    b: &[u8],
) -> Vec<String> {
    match spec.compare(status_a, a, status_b, b) {
        Verdict::Match => Vec::new(),
        Verdict::Mismatch(diffs) => diffs.into_iter().map(|d| d.field).collect(),
    }
}

/// A JSON pointer's reference tokens, unescaped; `None` when it is not a pointer (RFC 6901).
fn tokens(pointer: &str) -> Option<Vec<String>> {
    if pointer.is_empty() {
        return Some(Vec::new());
    }
    let rest = pointer.strip_prefix('/')?;
    rest.split('/')
        .map(|t| {
            let mut out = String::with_capacity(t.len());
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                match c {
                    '~' => match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return None,
                    },
                    c => out.push(c),
                }
            }
            Some(out)
        })
        .collect()
}

/// An array index as a pointer token spells it: decimal, no sign, no leading zero.
fn index(token: &str) -> Option<usize> {
    let i: usize = token.parse().ok()?;
    (i.to_string() == token).then_some(i)
}

/// The value at `path`, if there is one.
fn resolve<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(root, |v, t| match v {
        Value::Object(m) => m.get(t),
        Value::Array(a) => index(t).and_then(|i| a.get(i)),
        _ => None,
    })
}

/// Whether the value here is ignored: an ignore pointer ends here.
fn is_ignored(ignored: &[&[String]]) -> bool {
    ignored.iter().any(|p| p.is_empty())
}

/// The ignore paths that continue into member `key`, relative to it.
fn below<'a>(ignored: &[&'a [String]], key: &str) -> Vec<&'a [String]> {
    ignored
        .iter()
        .filter_map(|p| match p.split_first() {
            Some((first, rest)) if first == key => Some(rest),
            _ => None,
        })
        .collect()
}

/// Whether `a` and `b` are equal within `tol`, leaving out the members at `ignored` (paths
/// relative to `a` and `b`).
fn same(a: &Value, b: &Value, tol: f64, ignored: &[&[String]]) -> bool {
    if is_ignored(ignored) {
        return true;
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numbers_close(x, y, tol),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).enumerate().all(|(i, (u, v))| {
                    if ignored.is_empty() {
                        same(u, v, tol, &[])
                    } else {
                        same(u, v, tol, &below(ignored, &i.to_string()))
                    }
                })
        }
        (Value::Object(x), Value::Object(y)) => {
            x.iter().all(|(k, u)| {
                let sub = below(ignored, k);
                match y.get(k) {
                    Some(v) => same(u, v, tol, &sub),
                    None => is_ignored(&sub),
                }
            }) && y
                .keys()
                .all(|k| x.contains_key(k) || is_ignored(&below(ignored, k)))
        }
        _ => a == b,
    }
}

/// `|x - y| <= tol`; integers are compared exactly, so large ones that round to the same
/// `f64` still differ.
fn numbers_close(x: &Number, y: &Number, tol: f64) -> bool {
    fn int(n: &Number) -> Option<i128> {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    }
    if let (Some(a), Some(b)) = (int(x), int(y)) {
        let d = (a - b).unsigned_abs();
        return d == 0 || d as f64 <= tol;
    }
    match (x.as_f64(), y.as_f64()) {
        (Some(a), Some(b)) => a == b || (a - b).abs() <= tol,
        _ => false,
    }
}

/// A value as reported: without its ignored members (object members removed, array
/// elements replaced by `null` so the others keep their index), bounded.
fn reported(v: &Value, ignored: &[&[String]]) -> Value {
    bounded(stripped(v, ignored))
}

fn stripped(v: &Value, ignored: &[&[String]]) -> Value {
    if ignored.is_empty() {
        return v.clone();
    }
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, u) in m {
                let sub = below(ignored, k);
                if !is_ignored(&sub) {
                    out.insert(k.clone(), stripped(u, &sub));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, u)| {
                    let sub = below(ignored, &i.to_string());
                    if is_ignored(&sub) {
                        Value::Null
                    } else {
                        stripped(u, &sub)
                    }
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A writer that keeps at most `cap` bytes and fails once more are written, so serializing
/// a large value stops early.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
}

impl io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.cap - self.buf.len();
        if data.len() > room {
            self.buf.extend_from_slice(&data[..room]);
            return Err(io::Error::other("value longer than reported"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `v` itself when its compact JSON has at most [`MAX_VALUE_CHARS`] characters, else a
/// string of its first [`MAX_VALUE_CHARS`] characters.
fn bounded(v: Value) -> Value {
    // A character is at most 4 bytes, so this many bytes hold more than MAX_VALUE_CHARS of
    // them even when the last one is cut.
    let mut w = Capped {
        buf: Vec::new(),
        cap: 4 * MAX_VALUE_CHARS + 4,
    };
    let complete = serde_json::to_writer(&mut w, &v).is_ok();
    let text = String::from_utf8_lossy(&w.buf);
    if complete && text.chars().count() <= MAX_VALUE_CHARS {
        v
    } else {
        Value::String(text.chars().take(MAX_VALUE_CHARS).collect())
    }
}

/// A body as text (lossy UTF-8), cut to [`MAX_VALUE_CHARS`] characters.
fn text(body: &[u8]) -> Value {
    // 4 bytes per character at most: enough bytes for MAX_VALUE_CHARS whole characters.
    let head = &body[..body.len().min(4 * MAX_VALUE_CHARS)];
    Value::String(
        String::from_utf8_lossy(head)
            .chars()
            .take(MAX_VALUE_CHARS)
            .collect(),
    )
}

fn body_as_text(primary: &[u8], shadow: &[u8]) -> FieldDiff {
    FieldDiff {
        field: "body".to_owned(),
        primary: text(primary),
        shadow: text(shadow),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;
    use serde_json::json;

    fn spec(compare: &[&str], tol: f64, ignore: &[&str]) -> CompareSpec {
        CompareSpec::new(
            compare.iter().map(|s| s.to_string()).collect(),
            tol,
            ignore.iter().map(|s| s.to_string()).collect(),
        )
        .unwrap()
    }

    fn cmp(s: &CompareSpec, a: &str, b: &str) -> Verdict {
        s.compare(200, a.as_bytes(), 200, b.as_bytes())
    }

    fn diff(field: &str, primary: Value, shadow: Value) -> FieldDiff {
        FieldDiff {
            field: field.to_owned(),
            primary,
            shadow,
        }
    }

    #[test]
    fn pointers_compare_only_their_values() {
        let s = spec(&["/prediction", "/scores"], 0.0, &[]);
        let a = r#"{"prediction":"cat","scores":[0.5,0.25],"id":1}"#;
        let b = r#"{"id":2,"scores":[0.5,0.25],"prediction":"cat"}"#;
        assert_eq!(cmp(&s, a, b), Verdict::Match);
        let c = r#"{"prediction":"dog","scores":[0.5,0.25]}"#;
        assert_eq!(
            cmp(&s, a, c),
            Verdict::Mismatch(vec![diff("/prediction", json!("cat"), json!("dog"))])
        );
        // Both fields differ: both reported, in `compare` order.
        let d = r#"{"prediction":"dog","scores":[0.5]}"#;
        assert_eq!(
            noisy_fields(&s, 200, a.as_bytes(), 200, d.as_bytes()),
            ["/prediction", "/scores"]
        );
    }

    #[test]
    fn a_missing_value_is_null() {
        let s = spec(&["/label"], 0.0, &[]);
        assert_eq!(cmp(&s, "{}", r#"{"other":1}"#), Verdict::Match);
        assert_eq!(cmp(&s, "{}", r#"{"label":null}"#), Verdict::Match);
        assert_eq!(
            cmp(&s, "{}", r#"{"label":"x"}"#),
            Verdict::Mismatch(vec![diff("/label", Value::Null, json!("x"))])
        );
        // Pointers address into arrays with canonical indices only.
        let s = spec(&["/a/1", "/a/01"], 0.0, &[]);
        assert_eq!(
            cmp(&s, r#"{"a":[0,1]}"#, r#"{"a":[0,2]}"#),
            Verdict::Mismatch(vec![diff("/a/1", json!(1), json!(2))])
        );
    }

    #[test]
    fn escaped_pointer_tokens() {
        let s = spec(&["/a~1b/c~0d"], 0.0, &[]);
        assert!(cmp(&s, r#"{"a/b":{"c~d":1}}"#, r#"{"a/b":{"c~d":1}}"#).is_match());
        assert!(!cmp(&s, r#"{"a/b":{"c~d":1}}"#, r#"{"a/b":{"c~d":2}}"#).is_match());
        // The whole document.
        let s = spec(&[""], 0.0, &[]);
        assert!(cmp(&s, r#"{"a":1, "b":2}"#, r#"{"b":2,"a":1}"#).is_match());
        assert!(!cmp(&s, r#"{"a":1}"#, r#"{"a":1,"b":2}"#).is_match());
    }

    #[test]
    fn nested_arrays_and_objects_use_the_tolerance() {
        let s = spec(&["/out"], 0.1, &[]);
        let a = r#"{"out":[1.0,{"b":[2.0,"x"],"c":true}]}"#;
        let near = r#"{"out":[1.05,{"c":true,"b":[1.95,"x"]}]}"#;
        assert!(cmp(&s, a, near).is_match());
        for far in [
            r#"{"out":[1.2,{"b":[2.0,"x"],"c":true}]}"#, // number beyond tolerance
            r#"{"out":[1.0,{"b":[2.0,"y"],"c":true}]}"#, // string
            r#"{"out":[1.0,{"b":[2.0,"x"],"c":false}]}"#, // bool
            r#"{"out":[1.0,{"b":[2.0,"x"]}]}"#,          // member missing
            r#"{"out":[1.0,{"b":[2.0,"x"],"c":true,"d":null}]}"#, // extra member
            r#"{"out":[1.0,{"b":[2.0],"c":true}]}"#,     // shorter array
            r#"{"out":[1.0,{"b":[2.0,"x",3],"c":true}]}"#, // longer array
            r#"{"out":[{"b":[2.0,"x"],"c":true},1.0]}"#, // order of elements
            r#"{"out":[1.0,{"b":[2.0,"x"],"c":"true"}]}"#, // type
        ] {
            assert!(!cmp(&s, a, far).is_match(), "{far}");
            assert!(!cmp(&s, far, a).is_match(), "{far}");
        }
    }

    #[test]
    fn tolerance_edges() {
        // Values exact in binary, so |a - b| is exactly the tolerance.
        let s = spec(&["/x"], 0.5, &[]);
        assert!(cmp(&s, r#"{"x":1.0}"#, r#"{"x":1.5}"#).is_match());
        assert!(cmp(&s, r#"{"x":-0.25}"#, r#"{"x":0.25}"#).is_match());
        assert!(!cmp(&s, r#"{"x":1.0}"#, r#"{"x":1.5000001}"#).is_match());
        // Integers, and integers against floats.
        let s = spec(&["/x"], 2.0, &[]);
        assert!(cmp(&s, r#"{"x":10}"#, r#"{"x":12}"#).is_match());
        assert!(cmp(&s, r#"{"x":-1}"#, r#"{"x":1}"#).is_match());
        assert!(!cmp(&s, r#"{"x":10}"#, r#"{"x":13}"#).is_match());
        assert!(cmp(&s, r#"{"x":10}"#, r#"{"x":12.0}"#).is_match());
        assert!(cmp(
            &s,
            r#"{"x":18446744073709551615}"#,
            r#"{"x":18446744073709551613}"#
        )
        .is_match());
        // Zero tolerance: equal numbers however written; integers compared exactly, even
        // where they round to the same f64 (2^53 + 1 and 2^53).
        let s = spec(&["/x"], 0.0, &[]);
        assert!(cmp(&s, r#"{"x":1}"#, r#"{"x":1.0}"#).is_match());
        assert!(cmp(&s, r#"{"x":100}"#, r#"{"x":1e2}"#).is_match());
        assert!(cmp(&s, r#"{"x":0.0}"#, r#"{"x":-0.0}"#).is_match());
        assert!(!cmp(&s, r#"{"x":0.1}"#, r#"{"x":0.10000000000000002}"#).is_match());
        assert!(!cmp(&s, r#"{"x":9007199254740993}"#, r#"{"x":9007199254740992}"#).is_match());
        // An infinite tolerance: every number matches every number, nothing else.
        let s = spec(&["/x"], f64::INFINITY, &[]);
        assert!(cmp(&s, r#"{"x":-1e300}"#, r#"{"x":1e300}"#).is_match());
        assert!(!cmp(&s, r#"{"x":1}"#, r#"{"x":"1"}"#).is_match());
    }

    #[test]
    fn nan_and_infinity_are_not_json() {
        // JSON has no NaN or infinity: such a body is not JSON, so a compared field cannot be
        // read (a mismatch of the body), and the whole body is compared as bytes.
        assert!(serde_json::from_str::<Value>(r#"{"x":NaN}"#).is_err());
        assert!(serde_json::from_str::<Value>(r#"{"x":1e400}"#).is_err());
        let s = spec(&["/x"], 1.0, &[]);
        let nan = r#"{"x":NaN}"#;
        assert_eq!(
            cmp(&s, nan, nan),
            Verdict::Mismatch(vec![diff("body", json!(nan), json!(nan))])
        );
        let whole = spec(&[], 1.0, &[]);
        assert!(cmp(&whole, nan, nan).is_match());
        assert!(!cmp(&whole, nan, r#"{"x": NaN}"#).is_match());
    }

    #[test]
    fn ignore_under_compare() {
        let s = spec(
            &["/result", "/request_id", "/a/b"],
            0.0,
            &["/result/latency_ms", "/request_id", "/a"],
        );
        let a = r#"{"result":{"label":"cat","latency_ms":3},"request_id":"x","a":{"b":1}}"#;
        let b = r#"{"result":{"label":"cat","latency_ms":9},"request_id":"y","a":{"b":2}}"#;
        assert!(cmp(&s, a, b).is_match());
        // Present on one side only: still ignored.
        let c = r#"{"result":{"label":"cat"}}"#;
        assert!(cmp(&s, a, c).is_match());
        // The reported values leave the ignored member out.
        let d = r#"{"result":{"label":"dog","latency_ms":4}}"#;
        assert_eq!(
            cmp(&s, a, d),
            Verdict::Mismatch(vec![diff(
                "/result",
                json!({"label":"cat"}),
                json!({"label":"dog"})
            )])
        );
        // "/ab" is not under "/a"; an array element can be ignored.
        let s = spec(&["/ab", "/v"], 0.0, &["/a", "/v/1"]);
        assert_eq!(
            noisy_fields(
                &s,
                200,
                br#"{"ab":1,"v":[1,2,3]}"#,
                200,
                br#"{"ab":2,"v":[1,5,3]}"#
            ),
            ["/ab"]
        );
        assert_eq!(
            cmp(&s, r#"{"v":[1,2,3]}"#, r#"{"v":[0,5,3]}"#),
            Verdict::Mismatch(vec![diff("/v", json!([1, null, 3]), json!([0, null, 3]))])
        );
    }

    #[test]
    fn ignore_under_whole_body() {
        let s = spec(&[], 0.0, &["/latency_ms", "/meta/request_id", "/items/0/t"]);
        let a =
            r#"{"p":"cat","latency_ms":3,"meta":{"request_id":"a","v":1},"items":[{"t":1,"k":2}]}"#;
        let b =
            r#"{"items":[{"k":2,"t":5}],"meta":{"v":1,"request_id":"b"},"latency_ms":7,"p":"cat"}"#;
        assert!(cmp(&s, a, b).is_match());
        let c = r#"{"p":"cat","meta":{"v":1},"items":[{"k":2}]}"#;
        assert!(cmp(&s, a, c).is_match());
        let d = r#"{"p":"dog","meta":{"v":1},"items":[{"k":2}]}"#;
        assert_eq!(
            cmp(&s, a, d),
            Verdict::Mismatch(vec![diff(
                "body",
                json!({"p":"cat","meta":{"v":1},"items":[{"k":2}]}),
                json!({"p":"dog","meta":{"v":1},"items":[{"k":2}]})
            )])
        );
        // Ignoring the root ignores everything but the status.
        let s = spec(&[], 0.0, &[""]);
        assert!(cmp(&s, r#"{"a":1}"#, r#"[2]"#).is_match());
        assert!(!s.compare(200, b"{}", 500, b"{}").is_match());
    }

    #[test]
    fn whole_body_json_ignores_key_order_and_whitespace() {
        let s = spec(&[], 0.0, &[]);
        let a = r#"{"a":1,"b":[1,2,{"c":"x","d":null}]}"#;
        let b = "{\n  \"b\" : [ 1, 2.0, { \"d\": null, \"c\": \"x\" } ],\r\n\t\"a\": 1\n}\n";
        assert_eq!(cmp(&s, a, b), Verdict::Match);
        assert_eq!(
            cmp(&s, a, r#"{"a":2,"b":[1,2,{"c":"x","d":null}]}"#),
            Verdict::Mismatch(vec![diff(
                "body",
                json!({"a":1,"b":[1,2,{"c":"x","d":null}]}),
                json!({"a":2,"b":[1,2,{"c":"x","d":null}]})
            )])
        );
        // Scalars are JSON documents too.
        assert!(cmp(&s, "3", " 3.0 ").is_match());
        assert!(cmp(&s, r#""x""#, "\"x\"\n").is_match());
    }

    #[test]
    fn non_json_bodies_are_compared_as_bytes() {
        let s = spec(&[], 0.0, &[]);
        assert!(cmp(&s, "", "").is_match());
        assert!(cmp(&s, "hello", "hello").is_match());
        assert_eq!(
            cmp(&s, "hello", "hello "),
            Verdict::Mismatch(vec![diff("body", json!("hello"), json!("hello "))])
        );
        // One side JSON, the other not: bytes.
        assert_eq!(
            cmp(&s, "{}", "oops"),
            Verdict::Mismatch(vec![diff("body", json!("{}"), json!("oops"))])
        );
        // Lossy UTF-8, cut to MAX_VALUE_CHARS characters.
        let long = "é".repeat(300);
        let v = s.compare(200, long.as_bytes(), 200, b"\xff\xfeab");
        let Verdict::Mismatch(d) = v else {
            panic!("{v:?}")
        };
        assert_eq!(d[0].primary, json!("é".repeat(MAX_VALUE_CHARS)));
        assert_eq!(d[0].shadow, json!("\u{fffd}\u{fffd}ab"));
        // With `compare` set, a side that is not JSON is a mismatch of the body.
        let s = spec(&["/x"], 0.0, &[]);
        assert_eq!(
            cmp(&s, r#"{"x":1}"#, "<html>"),
            Verdict::Mismatch(vec![diff("body", json!(r#"{"x":1}"#), json!("<html>"))])
        );
        assert!(!cmp(&s, "", "").is_match());
    }

    #[test]
    fn large_values_are_reported_cut() {
        let s = spec(&["/v"], 0.0, &[]);
        let a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        b[999] = 0;
        let body = |v: &[u32]| json!({ "v": v }).to_string();
        let verdict = cmp(&s, &body(&a), &body(&b));
        let Verdict::Mismatch(d) = verdict else {
            panic!("{verdict:?}")
        };
        let Value::String(p) = &d[0].primary else {
            panic!("{:?}", d[0].primary)
        };
        assert_eq!(p.chars().count(), MAX_VALUE_CHARS);
        assert!(p.starts_with("[0,1,2,3,"));
        // Exactly MAX_VALUE_CHARS characters of JSON: kept as the value.
        let exact = "x".repeat(MAX_VALUE_CHARS - 2);
        assert_eq!(bounded(json!(exact)), json!(exact));
        let over = "x".repeat(MAX_VALUE_CHARS - 1);
        assert_eq!(
            bounded(json!(over)),
            json!(format!("\"{}", "x".repeat(MAX_VALUE_CHARS - 1)))
        );
    }

    #[test]
    fn status_mismatch_is_reported_alone() {
        let s = spec(&["/x"], 0.0, &[]);
        assert_eq!(
            s.compare(200, br#"{"x":1}"#, 503, b"not json"),
            Verdict::Mismatch(vec![diff("status", json!(200), json!(503))])
        );
        assert_eq!(noisy_fields(&s, 200, b"{}", 500, b"{}"), ["status"]);
        assert!(noisy_fields(&s, 404, br#"{"x":1}"#, 404, br#"{"x":1,"t":2}"#).is_empty());
    }

    #[test]
    fn invalid_specs_are_rejected() {
        for (compare, ignore) in [
            (vec!["prediction"], vec![]),
            (vec!["/ok"], vec!["latency_ms"]),
            (vec!["/a~2"], vec![]),
            (vec![], vec!["/a~"]),
            (vec!["#/a"], vec![]),
        ] {
            let bad = compare
                .iter()
                .chain(&ignore)
                .find(|p| tokens(p).is_none())
                .unwrap();
            let err = CompareSpec::new(
                compare.iter().map(|s| s.to_string()).collect(),
                0.0,
                ignore.iter().map(|s| s.to_string()).collect(),
            )
            .unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
            let list = if compare.contains(bad) {
                "compare"
            } else {
                "ignore"
            };
            assert!(err.starts_with(list), "{err}");
        }
        for tol in [-0.1, f64::NAN, f64::NEG_INFINITY] {
            let err = CompareSpec::new(vec![], tol, vec![]).unwrap_err();
            assert!(err.starts_with("numeric_tolerance"), "{err}");
        }
        assert!(
            CompareSpec::new(vec!["".into(), "/".into(), "/a~0~1/0".into()], 0.0, vec![]).is_ok()
        );
    }

    // ---------------------------------------------------------------------------------
    // Properties.

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-2i64..3).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            // Non-finite floats become null.
            any::<f64>().prop_map(Value::from),
            (-4i32..4).prop_map(|i| Value::from(f64::from(i) / 4.0)),
            prop::sample::select(vec!["", "a", "b", "é", "\"\\\n"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec!["a", "b", "c", "a/b", "~"]).prop_map(String::from),
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn any_spec() -> impl Strategy<Value = CompareSpec> {
        let pointers = || {
            prop::collection::vec(
                prop::sample::select(vec!["", "/a", "/b", "/a/0", "/a/b", "/a~1b", "/0", "/~0"]),
                0..3,
            )
        };
        (
            pointers(),
            prop::sample::select(vec![0.0, 0.25, 0.5, 1.0]),
            pointers(),
        )
            .prop_map(|(c, tol, i)| {
                CompareSpec::new(
                    c.into_iter().map(String::from).collect(),
                    tol,
                    i.into_iter().map(String::from).collect(),
                )
                .unwrap()
            })
    }

    /// `v` with every number moved by `delta`.
    fn nudged(v: &Value, delta: f64) -> Value {
        match v {
            Value::Number(n) => n.as_f64().map_or(Value::Null, |x| Value::from(x + delta)),
            Value::Array(a) => Value::Array(a.iter().map(|u| nudged(u, delta)).collect()),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, u)| (k.clone(), nudged(u, delta)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn runner(seed: u8) -> TestRunner {
        crate::analysis::testing::seeded_runner(seed, 512)
    }

    #[test]
    fn a_response_matches_itself() {
        runner(1)
            .run(
                &(json_value(), any_spec(), any::<bool>()),
                |(v, s, pretty)| {
                    let compact = serde_json::to_vec(&v).unwrap();
                    let other = if pretty {
                        serde_json::to_vec_pretty(&v).unwrap()
                    } else {
                        compact.clone()
                    };
                    prop_assert_eq!(s.compare(200, &compact, 200, &other), Verdict::Match);
                    prop_assert!(noisy_fields(&s, 503, &other, 503, &compact).is_empty());
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn swapping_the_sides_swaps_the_diffs() {
        // The second body: the same value, its numbers nudged (often to exactly the
        // tolerance), another value, or not JSON; and sometimes another status.
        let pair = (
            json_value(),
            json_value(),
            0..4u8,
            prop::sample::select(vec![0.0, 0.25, 0.5, 1.0]),
        )
            .prop_map(|(v, w, how, delta)| {
                let a = serde_json::to_vec(&v).unwrap();
                let b = match how {
                    0 => serde_json::to_vec(&nudged(&v, delta)).unwrap(),
                    1 => serde_json::to_vec(&w).unwrap(),
                    2 => [b"x".as_slice(), &a].concat(),
                    _ => a.clone(),
                };
                (a, b)
            });
        let statuses = prop::sample::select(vec![(200, 200), (200, 500)]);
        runner(2)
            .run(&(pair, any_spec(), statuses), |((a, b), s, (sa, sb))| {
                let forward = s.compare(sa, &a, sb, &b);
                let backward = s.compare(sb, &b, sa, &a);
                let swapped = match backward {
                    Verdict::Match => Verdict::Match,
                    Verdict::Mismatch(d) => Verdict::Mismatch(
                        d.into_iter()
                            .map(|f| diff(&f.field, f.shadow, f.primary))
                            .collect(),
                    ),
                };
                prop_assert_eq!(forward, swapped);
                Ok(())
            })
            .unwrap();
    }
}
