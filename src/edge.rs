//! The edge (Envoy ext_authz): a route map from HTTP requests to Cedar requests.
//! `PUT /items/{id}` → action `UpdateItem`, resource `Item::"{id}"`. Pure; no I/O.
//!
//! A check at the edge decides *before* the upstream writes, so it cannot close the
//! time-of-check/time-of-use race for the upstream's own write: an upstream that writes
//! should send the write to AuthorizeAndCommit (see docs/envoy.md).

use crate::model::Uid;
use serde::Deserialize;

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
        }
        Ok(map)
    }

    /// The first route matching `method` and `path` (the query string is ignored).
    pub fn resolve(&self, method: &str, path: &str) -> Option<EdgeRequest> {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let segments: Vec<&str> = path.split('/').collect();
        self.routes.iter().find_map(|r| {
            if r.method != "*" && !r.method.eq_ignore_ascii_case(method) {
                return None;
            }
            let pattern: Vec<&str> = r.path.split('/').collect();
            if pattern.len() != segments.len() {
                return None;
            }
            let mut captures: Vec<(&str, &str)> = Vec::new();
            for (p, s) in pattern.iter().zip(&segments) {
                match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(name) if !s.is_empty() => captures.push((name, s)),
                    Some(_) => return None,
                    None if p == s => {}
                    None => return None,
                }
            }
            let fill = |t: &str| captures.iter().fold(t.to_owned(), |acc, (n, v)| acc.replace(&format!("{{{n}}}"), v));
            Some(EdgeRequest {
                action: r.action.clone(),
                resource: Uid::new(fill(&r.resource.ty), fill(&r.resource.id)),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_capture_segments() {
        let m = RouteMap::parse(
            r#"{"routes": [
                {"method": "PUT", "path": "/items/{id}", "action": "UpdateItem", "resource": {"type": "Item", "id": "{id}"}},
                {"method": "*", "path": "/items/{id}/comments", "action": "ReadItem", "resource": {"type": "Item", "id": "{id}"}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(
            m.resolve("put", "/items/doc1?x=1"),
            Some(EdgeRequest { action: "UpdateItem".into(), resource: Uid::new("Item", "doc1") })
        );
        assert_eq!(m.resolve("GET", "/items/doc1/comments").unwrap().action, "ReadItem");
        assert_eq!(m.resolve("GET", "/items/doc1"), None);
        assert_eq!(m.resolve("PUT", "/items/"), None);
        assert_eq!(m.resolve("PUT", "/items/a/b"), None);
    }
}
