//! Fuzzes request decoding: protobuf bytes -> AuthorizeAndCommitRequest -> domain
//! mutations (value checks, nesting) -> merge patches and Cedar entity checks. Nothing
//! may panic; whatever is accepted must survive a JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep::grpc::{convert, pb};
use lockstep::model::{Change, EntityRecord};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::AuthorizeAndCommitRequest::decode(data) else { return };
    let Ok(req) = convert::commit_request(req, 16) else { return };
    for m in &req.mutations {
        let _ = lockstep::policy::action_uid(&m.action);
        let mut e = EntityRecord {
            uid: m.resource.clone(),
            attributes: Default::default(),
            parents: vec![],
            version: 1,
            tags: Default::default(),
        };
        match &m.change {
            Change::Create { attributes, parents, .. } => {
                e.attributes = attributes.clone();
                e.parents = parents.clone();
            }
            Change::Update { merge_patch, .. } => lockstep::engine::apply_merge_patch(&mut e.attributes, merge_patch),
            Change::Delete => {}
        }
        let _ = lockstep::policy::CompiledPolicies::empty().check_entity(&e);
        let json = serde_json::to_string(&e).expect("serializable");
        let back: EntityRecord = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, e);
    }
});
