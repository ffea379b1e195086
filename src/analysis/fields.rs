//! Values at JSON pointers, read from a response body without building the body.
//!
//! The body is walked structurally (objects, arrays, strings, and the bytes of numbers and
//! literals) and only the values at the wanted pointers are parsed, by serde_json, strictly.
//! Everything else is skipped at a few instructions a byte, and the walk stops as soon as
//! every wanted value has been read: the label and the score near the top of a model's answer
//! cost a fraction of parsing the whole answer. The walk is lenient where nothing is read (a
//! misspelt literal in a skipped field is skipped like any other, and what follows the last
//! value read is not looked at), and strict about the structure it walks: brackets, quotes or
//! commas that do not add up before then yield nothing, and so does anything after the body's
//! value when the walk reaches it.

use serde_json::Value;

/// Nesting deeper than this yields nothing (a hostile body cannot exhaust the stack).
pub const MAX_DEPTH: usize = 128;

/// A JSON pointer's reference tokens, unescaped (`~1` is `/`, `~0` is `~`).
pub fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// The values at `paths` (token lists from [`tokens`]) in the JSON `body`, by index; `None`
/// for a path the body lacks, and for every path when the body is not JSON.
pub fn extract_all<const N: usize>(body: &[u8], paths: [&[String]; N]) -> [Option<Value>; N] {
    let mut out = [const { None }; N];
    let wanted: [(usize, &[String]); N] = std::array::from_fn(|i| (i, paths[i]));
    let mut w = Walker {
        b: body,
        i: 0,
        left: N,
    };
    let ok = w.value(&wanted, &mut out, 0).is_some()
        && (w.left == 0 || {
            w.ws();
            w.i == body.len()
        });
    if ok {
        out
    } else {
        [const { None }; N]
    }
}

struct Walker<'b> {
    b: &'b [u8],
    i: usize,
    /// Wanted values not read yet; at 0 the walk stops.
    left: usize,
}

impl Walker<'_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Walks one value; `None` when the structure is broken.
    fn value(
        &mut self,
        paths: &[(usize, &[String])],
        out: &mut [Option<Value>],
        depth: usize,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        if paths.iter().any(|(_, p)| p.is_empty()) {
            return self.take(paths, out);
        }
        match self.peek()? {
            b'{' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    let (start, end, escaped) = self.string()?;
                    self.ws();
                    if self.peek()? != b':' {
                        return None;
                    }
                    self.i += 1;
                    let key = &self.b[start..end];
                    let below: Vec<(usize, &[String])> = if paths.is_empty() {
                        Vec::new()
                    } else {
                        let decoded;
                        let key: &[u8] = if escaped {
                            decoded =
                                serde_json::from_slice::<String>(&self.b[start - 1..=end]).ok()?;
                            decoded.as_bytes()
                        } else {
                            key
                        };
                        paths
                            .iter()
                            .filter(|(_, p)| p.first().is_some_and(|t| t.as_bytes() == key))
                            .map(|&(k, p)| (k, &p[1..]))
                            .collect()
                    };
                    self.value(&below, out, depth + 1)?;
                    if self.item_ends(b'}')? {
                        return Some(());
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(());
                }
                let mut index = 0usize;
                loop {
                    let below: Vec<(usize, &[String])> = paths
                        .iter()
                        .filter(|(_, p)| {
                            p.first().and_then(|t| t.parse::<usize>().ok()) == Some(index)
                        })
                        .map(|&(k, p)| (k, &p[1..]))
                        .collect();
                    self.value(&below, out, depth + 1)?;
                    if self.item_ends(b']')? {
                        return Some(());
                    }
                    index += 1;
                }
            }
            b'"' => self.string().map(|_| ()),
            _ => {
                // A number or a literal: its bytes up to a delimiter.
                let start = self.i;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.') {
                        self.i += 1;
                    } else {
                        break;
                    }
                }
                (self.i > start).then_some(())
            }
        }
    }

    /// After an item of an object or array closed by `close`: `true` when the walk is done
    /// (every wanted value read, or the container closed), `false` after a comma.
    fn item_ends(&mut self, close: u8) -> Option<bool> {
        if self.left == 0 {
            return Some(true);
        }
        self.ws();
        match self.peek()? {
            b',' => {
                self.i += 1;
                Some(false)
            }
            c if c == close => {
                self.i += 1;
                Some(true)
            }
            _ => None,
        }
    }

    /// A string at `i` (which must be `"`): the bounds of its content, and whether it holds
    /// escapes; `i` moves past the closing quote.
    fn string(&mut self) -> Option<(usize, usize, bool)> {
        if self.peek()? != b'"' {
            return None;
        }
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        loop {
            // The next quote or backslash, found a word at a time.
            let at = memchr::memchr2(b'"', b'\\', self.b.get(self.i..)?)?;
            self.i += at;
            if self.b[self.i] == b'"' {
                let end = self.i;
                self.i += 1;
                return Some((start, end, escaped));
            }
            escaped = true;
            self.i += 2;
        }
    }

    /// Parses the value here (strictly) for the paths that end here, and reads the longer
    /// ones from it.
    fn take(&mut self, paths: &[(usize, &[String])], out: &mut [Option<Value>]) -> Option<()> {
        let mut values =
            serde_json::Deserializer::from_slice(&self.b[self.i..]).into_iter::<Value>();
        let v = values.next()?.ok()?;
        self.i += values.byte_offset();
        self.left = self.left.saturating_sub(paths.len());
        if let [(k, rest)] = paths {
            if rest.is_empty() {
                // The usual case: one pointer, ending here; the value moves, no copy.
                if let Some(slot) = out.get_mut(*k) {
                    *slot = Some(v);
                }
                return Some(());
            }
        }
        for &(k, rest) in paths {
            let mut cur = Some(&v);
            for t in rest {
                cur = cur.and_then(|c| match c {
                    Value::Object(m) => m.get(t),
                    Value::Array(a) => t.parse::<usize>().ok().and_then(|n| a.get(n)),
                    _ => None,
                });
            }
            if let Some(slot) = out.get_mut(k) {
                *slot = cur.cloned();
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn one(body: &[u8], pointer: &str) -> Option<Value> {
        let t = tokens(pointer);
        let [v] = extract_all(body, [&t]);
        v
    }

    #[test]
    fn it_finds_what_a_json_pointer_finds() {
        let body = br#" {"a": {"b/c": [1, {"d": "x\"y"}], "m~n": 2.5, "k\u0041": 3}, "e": null, "f": [true, -1e3]} "#;
        let v: Value = serde_json::from_slice(body).expect("json");
        for p in [
            "",
            "/a",
            "/a/b~1c",
            "/a/b~1c/1/d",
            "/a/b~1c/0",
            "/a/m~0n",
            "/a/kA",
            "/e",
            "/f/0",
            "/f/1",
            "/zz",
            "/a/b~1c/9",
            "/f/x",
        ] {
            assert_eq!(one(body, p), v.pointer(p).cloned(), "{p}");
        }
        let (a, b, c) = (tokens("/a"), tokens("/a/m~0n"), tokens("/f/1"));
        assert_eq!(
            extract_all(body, [&a, &b, &c]),
            [
                v.pointer("/a").cloned(),
                Some(json!(2.5)),
                Some(json!(-1000.0))
            ]
        );
    }

    #[test]
    fn broken_bodies_yield_nothing() {
        for body in [
            &b"not json"[..],
            br#"{"b": 1} trailing"#,
            br#"{"b": 1"#,
            br#"{"a" 1}"#,
            br#"{"b": 1,}x"#,
            br#"[1 2]"#,
            br#"{"a": "unterminated}"#,
            b"",
        ] {
            assert_eq!(one(body, "/a"), None, "{}", String::from_utf8_lossy(body));
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert_eq!(one(deep.as_bytes(), "/0"), None);
        // A value that is wanted is parsed strictly.
        assert_eq!(one(br#"{"a": tru}"#, "/a"), None);
        // The walk stops at the last value wanted: what follows is not looked at.
        assert_eq!(one(br#"{"a": 1, "b": [} trailing"#, "/a"), Some(json!(1)));
        assert_eq!(one(br#"{"a": 1"#, "/a"), Some(json!(1)));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            (-1e6f64..1e6).prop_map(|x| json!(x)),
            "[a-z\"\\\\/~ ]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-c/~\"]{0,3}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Every pointer that exists in `v`, and one more that does not, per container.
    fn pointers(v: &Value, prefix: String, out: &mut Vec<String>) {
        out.push(prefix.clone());
        let esc = |k: &str| k.replace('~', "~0").replace('/', "~1");
        match v {
            Value::Object(m) => {
                out.push(format!("{prefix}/nope"));
                for (k, x) in m {
                    pointers(x, format!("{prefix}/{}", esc(k)), out);
                }
            }
            Value::Array(a) => {
                out.push(format!("{prefix}/{}", a.len()));
                for (i, x) in a.iter().enumerate() {
                    pointers(x, format!("{prefix}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn agrees_with_serde_json_on_arbitrary_documents() {
        let mut runner = crate::analysis::testing::seeded_runner(11, 256);
        runner
            .run(&(json_value(), any::<bool>()), |(v, pretty)| {
                let body = if pretty {
                    serde_json::to_vec_pretty(&v)
                } else {
                    serde_json::to_vec(&v)
                }
                .expect("serialises");
                // What serde_json reads back (floats need not round-trip exactly).
                let v: Value = serde_json::from_slice(&body).expect("parses");
                let mut all = Vec::new();
                pointers(&v, String::new(), &mut all);
                for p in &all {
                    prop_assert_eq!(one(&body, p), v.pointer(p).cloned(), "{}", p);
                }
                // Two at once give the same as one by one.
                for pair in all.windows(2) {
                    let (a, b) = (tokens(&pair[0]), tokens(&pair[1]));
                    prop_assert_eq!(
                        extract_all(&body, [&a, &b]),
                        [v.pointer(&pair[0]).cloned(), v.pointer(&pair[1]).cloned()]
                    );
                }
                Ok(())
            })
            .expect("property holds");
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_json_among_them_reads_right() {
        let mut runner = crate::analysis::testing::seeded_runner(12, 512);
        runner
            .run(&prop::collection::vec(any::<u8>(), 0..64), |bytes| {
                let t = tokens("/a");
                let [got] = extract_all(&bytes, [&t]);
                // Where the bytes are JSON, the answer is serde_json's. (Where they are not,
                // a value may still be read before the walk reaches the fault.)
                if let Ok(parsed) = serde_json::from_slice::<Value>(&bytes) {
                    prop_assert_eq!(got, parsed.pointer("/a").cloned());
                }
                Ok(())
            })
            .expect("property holds");
    }
}
