//! The edge (Envoy ext_authz): a route map from HTTP requests to Cedar requests.
//! `PUT /items/{id}` → action `UpdateItem`, resource `Item::"{id}"`. Pure; no I/O.
//!
//! A check at the edge decides *before* the upstream writes, so it cannot close the
//! time-of-check/time-of-use race for the upstream's own write: an upstream that writes
//! should send the write to AuthorizeAndCommit (see docs/envoy.md).
//!
//! The decision must be on the resource the upstream will route to, so a path is read the
//! way an upstream reads it — each segment percent-decoded exactly once — and whatever an
//! upstream could read another way is refused (see [`decode_segment`]).

use crate::model::Uid;
use serde::Deserialize;

/// The longest HTTP path (query included) an edge check decides on, like a token's 8 KiB.
pub const MAX_PATH_BYTES: usize = 8 * 1024;
/// The longest HTTP method an edge check accepts (the longest registered ones are ~17).
pub const MAX_METHOD_BYTES: usize = 32;

/// One route: `method` (or `*`) and a path template whose `{name}` segments capture.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub method: String,
    pub path: String,
    pub action: String,
    pub resource: ResourceTemplate,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceTemplate {
    #[serde(rename = "type")]
    pub ty: String,
    pub id: String,
}

/// The route map, read from the file given to `serve --ext-authz-routes`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMap {
    pub routes: Vec<Route>,
}

/// What a matched route asks Cedar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeRequest {
    pub action: String,
    pub resource: Uid,
}

impl RouteMap {
    pub fn parse(text: &str) -> Result<Self, String> {
        let map: RouteMap = serde_json::from_str(text).map_err(|e| format!("invalid route map: {e}"))?;
        for r in &map.routes {
            if !r.path.starts_with('/') {
                return Err(format!("route path `{}` must start with /", r.path));
            }
            crate::policy::action_uid(&r.action).map_err(|e| format!("route `{} {}`: {e}", r.method, r.path))?;
            // One name, one value: `/orgs/{id}/items/{id}` would decide on one segment
            // while the upstream may act on the other.
            let names: Vec<&str> = r.path.split('/').filter_map(capture_name).collect();
            if let Some((_, n)) = names.iter().enumerate().find(|(i, n)| names[..*i].contains(n)) {
                return Err(format!("route `{} {}` captures `{{{n}}}` twice", r.method, r.path));
            }
        }
        Ok(map)
    }

    /// The first route matching `method` and `path` (the query string is ignored), with
    /// its segments percent-decoded once: `Ok(None)` when no route matches, `Err` (a short
    /// reason without user input) when the request is refused whatever the routes say.
    pub fn resolve(&self, method: &str, path: &str) -> Result<Option<EdgeRequest>, &'static str> {
        if method.is_empty() || method.len() > MAX_METHOD_BYTES || !method.bytes().all(is_tchar) {
            return Err("method is not an HTTP token of at most 32 bytes");
        }
        if path.len() > MAX_PATH_BYTES {
            return Err("path longer than 8 KiB");
        }
        let path = path.split('?').next().unwrap_or_default();
        let Some(rest) = path.strip_prefix('/') else {
            return Err("path does not start with /");
        };
        let raw: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(raw.len() + 1);
        segments.push(String::new());
        for (i, s) in raw.iter().enumerate() {
            if s.is_empty() && i + 1 < raw.len() {
                return Err("empty path segment (`//`)");
            }
            segments.push(decode_segment(s)?);
        }
        Ok(self.routes.iter().find_map(|r| {
            if r.method != "*" && !r.method.eq_ignore_ascii_case(method) {
                return None;
            }
            let pattern: Vec<&str> = r.path.split('/').collect();
            if pattern.len() != segments.len() {
                return None;
            }
            let mut captures: Vec<(&str, &str)> = Vec::new();
            for (p, s) in pattern.iter().zip(&segments) {
                match capture_name(p) {
                    Some(name) if !s.is_empty() => captures.push((name, s)),
                    Some(_) => return None,
                    None if p == s => {}
                    None => return None,
                }
            }
            Some(EdgeRequest {
                action: r.action.clone(),
                resource: Uid::new(fill(&r.resource.ty, &captures), fill(&r.resource.id, &captures)),
            })
        }))
    }
}

/// `{name}` → `name`.
fn capture_name(pattern_segment: &str) -> Option<&str> {
    pattern_segment.strip_prefix('{').and_then(|p| p.strip_suffix('}'))
}

/// RFC 9110 `tchar`: what an HTTP method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Fills `{name}` placeholders in one pass over the template: a captured value is copied
/// in and never scanned again, so a segment that reads `{id}` stays `{id}`. A placeholder
/// with no capture stays as written.
fn fill(template: &str, captures: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let hit = captures.iter().find(|(n, _)| after.strip_prefix(n).is_some_and(|t| t.starts_with('}')));
        match hit {
            Some((n, v)) => {
                out.push_str(v);
                rest = &after[n.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One path segment as the upstream will route it: percent-decoded exactly once. Refused
/// (the reason says why) is whatever an upstream or a proxy between could read as another
/// segment or another value: a `%` not followed by two hex digits; an encoded `/` or `\`
/// (`%2F`, `%5C`) and a raw `\`; `;` raw or encoded (matrix parameters, which some
/// frameworks strip); an encoded `%` (`%25`, so `%2531` is never `1` to anyone); a raw
/// `#`, space, control or non-ASCII byte; decoded bytes that are not UTF-8 or decode to
/// a control character (`%00`, `%0A`); and the dot segments `.` and `..` (also encoded).
pub fn decode_segment(raw: &str) -> Result<String, &'static str> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |j: usize| bytes.get(j).and_then(|b| char::from(*b).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Err("malformed percent-encoding in path");
                };
                let b = u8::try_from(hi * 16 + lo).unwrap_or(0);
                match b {
                    b'/' | b'\\' => return Err("encoded path separator (`%2F` or `%5C`)"),
                    b'%' => return Err("encoded `%` in path (double encoding)"),
                    b';' => return Err("`;` in path segment"),
                    _ => out.push(b),
                }
                i += 3;
            }
            b';' => return Err("`;` in path segment"),
            b'\\' => return Err("backslash in path"),
            b'#' => return Err("fragment in path"),
            b @ 0x21..=0x7e => {
                out.push(b);
                i += 1;
            }
            _ => return Err("space, control or non-ASCII character in path"),
        }
    }
    let s = String::from_utf8(out).map_err(|_| "percent-encoded path segment is not UTF-8")?;
    if s.chars().any(char::is_control) {
        return Err("control character in path");
    }
    if s == "." || s == ".." {
        return Err("dot segment (`.` or `..`) in path");
    }
    Ok(s)
}

/// At most `max` bytes of `s` for an audit detail: cut at a character boundary (`…` marks
/// the cut) and control characters escaped, so no request can make a large or
/// multi-line audit row.
pub fn excerpt(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let piece: String = if c.is_control() { c.escape_default().collect() } else { c.into() };
        if out.len() + piece.len() > max {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> RouteMap {
        RouteMap::parse(
            r#"{"routes": [
                {"method": "PUT", "path": "/items/{id}", "action": "UpdateItem", "resource": {"type": "Item", "id": "{id}"}},
                {"method": "*", "path": "/items/{id}/comments", "action": "ReadItem", "resource": {"type": "Item", "id": "{id}"}},
                {"method": "GET", "path": "/orgs/{org}/items/{id}", "action": "ReadItem", "resource": {"type": "Item", "id": "{org}/{id}"}}
            ]}"#,
        )
        .unwrap()
    }

    fn item(id: &str) -> Option<EdgeRequest> {
        Some(EdgeRequest { action: "UpdateItem".into(), resource: Uid::new("Item", id) })
    }

    #[test]
    fn templates_capture_segments() {
        let m = map();
        assert_eq!(m.resolve("put", "/items/doc1?x=1"), Ok(item("doc1")));
        assert_eq!(m.resolve("GET", "/items/doc1/comments").unwrap().unwrap().action, "ReadItem");
        assert_eq!(m.resolve("GET", "/items/doc1"), Ok(None));
        assert_eq!(m.resolve("PUT", "/items/"), Ok(None));
        assert_eq!(m.resolve("PUT", "/items/a/b"), Ok(None));
    }

    #[test]
    fn segments_are_decoded_once() {
        let m = map();
        assert_eq!(m.resolve("PUT", "/items/doc%31"), Ok(item("doc1")));
        assert_eq!(m.resolve("PUT", "/items/secre%74"), Ok(item("secret")));
        assert_eq!(m.resolve("PUT", "/it%65ms/doc1"), Ok(item("doc1")), "literal segments compare decoded");
        assert_eq!(m.resolve("PUT", "/items/caf%C3%A9"), Ok(item("café")));
        assert_eq!(m.resolve("PUT", "/items/a%20b%3Fc"), Ok(item("a b?c")));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let m = map();
        for path in [
            "/items/a%2Fb",
            "/items/a%2fb",
            "/items/a%5Cb",
            "/items/a\\b",
            "/items/doc1;x=1",
            "/items/doc1%3Bx",
            "/items/..",
            "/items/.",
            "/items/%2e%2E",
            "/items/doc%2531",
            "/items/doc%3",
            "/items/doc%zz",
            "/items/doc%00",
            "/items/doc%0A",
            "/items/doc%FF",
            "/items/doc%C3",
            "/items/do c",
            "/items/doc\u{e9}",
            "/items/doc#x",
            "//items/doc",
            "/items//doc",
            "items/doc",
            "*",
        ] {
            assert!(m.resolve("PUT", path).is_err(), "{path}");
        }
        assert!(m.resolve("PUT", &format!("/items/{}", "a".repeat(MAX_PATH_BYTES))).is_err());
        assert!(m.resolve("PUT", &format!("/items/{}", "a".repeat(MAX_PATH_BYTES - 10))).is_ok());
        assert!(m.resolve(&"P".repeat(MAX_METHOD_BYTES + 1), "/items/doc").is_err());
        assert!(m.resolve("PU T", "/items/doc").is_err());
        assert!(m.resolve("", "/items/doc").is_err());
        assert_eq!(m.resolve("PUT", "/items/doc?a=%2F;..#"), Ok(item("doc")), "the query is not decided on");
    }

    #[test]
    fn captures_are_substituted_once() {
        let m = map();
        let r = |p: &str| m.resolve("GET", p).unwrap().unwrap().resource.id;
        assert_eq!(r("/orgs/acme/items/x"), "acme/x");
        assert_eq!(r("/orgs/{id}/items/x"), "{id}/x");
        assert_eq!(r("/orgs/%7Bid%7D/items/x"), "{id}/x");
        assert_eq!(r("/orgs/a/items/{org}"), "a/{org}");
        assert_eq!(fill("{a{b}}{c}", &[("b", "{c}"), ("c", "C")]), "{a{c}}C");
    }

    #[test]
    fn a_name_captured_twice_is_refused() {
        let e = RouteMap::parse(
            r#"{"routes": [{"method": "GET", "path": "/o/{id}/i/{id}", "action": "ReadItem", "resource": {"type": "Item", "id": "{id}"}}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn excerpts_are_bounded_and_one_line() {
        assert_eq!(excerpt("abc", 10), "abc");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(excerpt("a\nb", 10), "a\\nb");
        assert_eq!(excerpt("ééé", 3), "é…");
    }
}
