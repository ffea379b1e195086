//! `GET /`: the dashboard, one self-contained page (HTML, CSS and JS compiled into the
//! binary) that polls the admin API of its own origin.
//!
//! The page is `dashboard.html` with `dashboard.css` and `dashboard.js` put inline in place of
//! its `@STYLE@` and `@SCRIPT@` markers. Its Content-Security-Policy admits exactly that
//! style and that script (by SHA-256 hash, computed once), fetches to the same origin and
//! nothing else: no external asset, no inline handler, no framing.

use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Response;
use http_body_util::Full;
use sha2::{Digest, Sha256};

const TEMPLATE: &str = include_str!("dashboard.html");
const STYLE: &str = include_str!("dashboard.css");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE_MARKER: &str = "@STYLE@";
const SCRIPT_MARKER: &str = "@SCRIPT@";

struct Page {
    html: Bytes,
    csp: HeaderValue,
}

fn built() -> &'static Page {
    static PAGE: OnceLock<Page> = OnceLock::new();
    PAGE.get_or_init(|| {
        let html = TEMPLATE
            .replacen(STYLE_MARKER, STYLE, 1)
            .replacen(SCRIPT_MARKER, SCRIPT, 1);
        let csp = csp(STYLE, SCRIPT);
        Page {
            html: Bytes::from(html),
            csp: HeaderValue::from_str(&csp).expect("the CSP is ASCII"),
        }
    })
}

/// The Content-Security-Policy admitting exactly `style` and `script` as inline texts.
fn csp(style: &str, script: &str) -> String {
    format!(
        "default-src 'none'; connect-src 'self'; img-src 'self' data:; style-src '{}'; \
         script-src '{}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        source_hash(style),
        source_hash(script)
    )
}

/// `sha256-<base64 of the SHA-256 of text>`, a CSP hash source.
fn source_hash(text: &str) -> String {
    use base64::Engine as _;
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The dashboard page with its headers.
pub(super) fn page() -> Response<Full<Bytes>> {
    let page = built();
    let mut resp = Response::new(Full::new(page.html.clone()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, page.csp.clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn html() -> String {
        String::from_utf8(built().html.to_vec()).expect("UTF-8")
    }

    /// The text between `open` and the next `close` after it, for every occurrence.
    fn elements<'a>(html: &'a str, open: &str, close: &str) -> Vec<&'a str> {
        let mut out = Vec::new();
        let mut rest = html;
        while let Some(i) = rest.find(open) {
            let body = &rest[i + open.len()..];
            let end = body.find(close).expect("element closed");
            out.push(&body[..end]);
            rest = &body[end..];
        }
        out
    }

    #[test]
    fn a_csp_hash_source_is_the_base64_sha256_of_the_text() {
        // SHA-256 of "" in the form CSP uses (`printf "" | openssl dgst -sha256 -binary | base64`).
        assert_eq!(
            source_hash(""),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn the_page_has_no_external_reference() {
        let html = html();
        let lower = html.to_ascii_lowercase();
        for needle in [
            "http:",
            "https:",
            "//",
            "@import",
            "url(",
            "<link rel=\"stylesheet",
        ] {
            assert!(!lower.contains(needle), "the page contains {needle:?}");
        }
        // No element loads anything but the inline data: icon.
        for attr in [" src=", " href=", " action=", " srcset="] {
            for (i, _) in lower.match_indices(attr) {
                let value = &lower[i + attr.len()..];
                assert!(
                    value.starts_with("\"data:"),
                    "{attr} at byte {i}: {}",
                    &html[i..(i + 60).min(html.len())]
                );
            }
        }
        // Only the one style and the one script, inline, and nothing that CSP would block:
        // no inline event handler or style attribute.
        assert_eq!(lower.matches("<script").count(), 1);
        assert_eq!(lower.matches("<style").count(), 1);
        assert!(!lower.contains(" style="), "inline style attribute");
        assert!(!lower.contains(" onclick=") && !lower.contains(" onload="));
        assert!(!html.contains(STYLE_MARKER) && !html.contains(SCRIPT_MARKER));
        assert!(!SCRIPT.contains("</script") && !STYLE.contains("</style"));
        assert!(!SCRIPT.contains("localStorage") && !SCRIPT.contains("sessionStorage"));
        assert!(!SCRIPT.contains("document.cookie"));
    }

    #[test]
    fn the_csp_hashes_match_the_inline_texts() {
        let html = html();
        let styles = elements(&html, "<style>", "</style>");
        let scripts = elements(&html, "<script>", "</script>");
        assert_eq!((styles.len(), scripts.len()), (1, 1));
        assert_eq!(styles[0], STYLE);
        assert_eq!(scripts[0], SCRIPT);

        let resp = page();
        let csp = resp.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        let directive = |name: &str| -> String {
            csp.split(';')
                .map(str::trim)
                .find_map(|d| d.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in {csp}"))
        };
        assert_eq!(
            directive("style-src"),
            format!("'{}'", source_hash(styles[0]))
        );
        assert_eq!(
            directive("script-src"),
            format!("'{}'", source_hash(scripts[0]))
        );
        assert_eq!(directive("default-src"), "'none'");
        assert_eq!(directive("connect-src"), "'self'");
        assert_eq!(directive("frame-ancestors"), "'none'");
        assert_eq!(directive("base-uri"), "'none'");
        assert_eq!(directive("form-action"), "'none'");

        let h = resp.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }
}
