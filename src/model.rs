//! Domain types shared by the use cases, the store and the transport: entity uids,
//! entities, mutations, keys, audit events. No protobuf and no SQL here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// A Cedar entity uid as the caller names it: a type (`User`, `App::Document`) and an id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Uid {
    #[serde(rename = "type")]
    pub ty: String,
    pub id: String,
}

impl Uid {
    pub fn new(ty: impl Into<String>, id: impl Into<String>) -> Self {
        Self { ty: ty.into(), id: id.into() }
    }

    /// The uid in Cedar's JSON entity-reference form, `{"__entity": {...}}`.
    pub fn to_entity_ref_json(&self) -> Value {
        serde_json::json!({ "__entity": { "type": self.ty, "id": self.id } })
    }
}

impl fmt::Display for Uid {
    /// Cedar syntax: `User::"alice"` (the id escaped as Cedar and JSON escape strings).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}::{}", self.ty, Value::String(self.id.clone()))
    }
}

/// Attributes in Cedar's JSON entity format (see the contract's header comment).
pub type Attributes = Map<String, Value>;

/// An entity as stored: attributes, parents and the version that counts its changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntityRecord {
    pub uid: Uid,
    pub attributes: Attributes,
    #[serde(default)]
    pub parents: Vec<Uid>,
    /// Starts at 1 on create and grows by 1 with every committed change.
    pub version: u64,
    /// Cedar entity tags (`hasTag` / `getTag`), Cedar JSON values like the attributes.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub tags: Attributes,
}

/// What a mutation does to its entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Change {
    Create {
        attributes: Attributes,
        #[serde(default)]
        parents: Vec<Uid>,
        #[serde(default, skip_serializing_if = "Map::is_empty")]
        tags: Attributes,
    },
    Update {
        merge_patch: Attributes,
        #[serde(default)]
        add_parents: Vec<Uid>,
        #[serde(default)]
        remove_parents: Vec<Uid>,
        #[serde(default, skip_serializing_if = "Map::is_empty")]
        tags_merge_patch: Attributes,
    },
    Delete,
}

impl Change {
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Create { .. } => "create",
            Change::Update { .. } => "update",
            Change::Delete => "delete",
        }
    }
}

/// One requested state change, authorized as the Cedar request
/// (principal = the token's subject, action, resource = the entity).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mutation {
    /// As the caller wrote it: `UpdateItem` or `App::Action::"UpdateItem"`.
    pub action: String,
    pub resource: Uid,
    pub change: Change,
    #[serde(default)]
    pub if_version: Option<u64>,
}

/// An AuthorizeAndCommit request in domain terms.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommitRequest {
    pub mutations: Vec<Mutation>,
    /// The caller's context record (Cedar JSON); `token` and `change` are set by the server.
    pub context: Attributes,
    pub idempotency_key: String,
}

/// What a committed AuthorizeAndCommit returns; also what an idempotent repeat returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitResult {
    pub entities: Vec<EntityRecord>,
    pub audit_seq: u64,
    pub determining_policies: Vec<String>,
}

/// A verification key as stored.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct KeyRecord {
    pub kid: String,
    pub algorithm: String,
    /// HMAC secret; never logged, never returned by an RPC.
    pub secret: Vec<u8>,
    pub public_key_pem: String,
    pub issuer: String,
    pub audience: String,
    pub principal_type: String,
    pub revoked: bool,
    /// Unix microseconds.
    pub added_at: i64,
    /// The JWK (JSON) for keys imported from a JWKS; empty otherwise.
    pub jwk: String,
    /// Where the key came from: empty (added), a JWKS URL, or `jwks-file`.
    pub source: String,
    /// Gone from the JWKS it came from: no longer verifies (unlike `revoked`, a later
    /// refresh that publishes it again brings it back).
    pub retired: bool,
    /// Required `typ` header (e.g. `at+jwt`, RFC 9068); empty: not checked.
    pub required_typ: String,
    /// Longest accepted `exp - iat`; 0: only the server's maximum applies.
    pub max_lifetime_secs: i64,
    /// The current first-party signing key (`token issue` without `--kid`).
    pub signing: bool,
    /// PKCS#8 private key of first-party asymmetric keys; never logged or returned.
    pub private_key: Vec<u8>,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("secret", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("principal_type", &self.principal_type)
            .field("revoked", &self.revoked)
            .field("source", &self.source)
            .field("retired", &self.retired)
            .field("required_typ", &self.required_typ)
            .field("max_lifetime_secs", &self.max_lifetime_secs)
            .field("signing", &self.signing)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// A version of the policy set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub version: u64,
    pub policies: String,
    pub schema: String,
    /// Unix microseconds.
    pub created_at: i64,
}

/// A template-linked policy: a Cedar template with its slots filled (e.g. "bob may view
/// this document"), created and removed by the Admin service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateLink {
    pub link_id: String,
    pub template_id: String,
    /// `?principal`, when the template has that slot.
    pub principal: Option<Uid>,
    /// `?resource`, when the template has that slot.
    pub resource: Option<Uid>,
}

/// What selects the compiled policy set: the policy version and the generation of the
/// template links, both read inside the deciding transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub version: Option<u64>,
    pub links: u64,
}

/// What a call's authentication reads after the key, in one go: the subject's and the
/// token's revocation, and the policy state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallState {
    /// Unix seconds: the subject's tokens issued at or before it are revoked.
    pub subject_revoked_at: Option<i64>,
    pub token_revoked: bool,
    pub policy: PolicyState,
}

/// The kinds of audit events, numbered as in the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditKind {
    Commit = 1,
    Deny = 2,
    RevokeToken = 3,
    RevokeSubject = 4,
    RevokeKey = 5,
    AddKey = 6,
    PutPolicies = 7,
    /// A decision taken at the edge (Envoy ext_authz), allowed or denied: see `detail`.
    EdgeDecision = 8,
    /// Audit retention exported the oldest events to files and dropped them: see `detail`.
    AuditExported = 9,
}

impl AuditKind {
    pub fn from_i64(v: i64) -> Option<Self> {
        Some(match v {
            1 => Self::Commit,
            2 => Self::Deny,
            3 => Self::RevokeToken,
            4 => Self::RevokeSubject,
            5 => Self::RevokeKey,
            6 => Self::AddKey,
            7 => Self::PutPolicies,
            8 => Self::EdgeDecision,
            9 => Self::AuditExported,
            _ => return None,
        })
    }
}

/// An audit event before the store gives it its `seq` and time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NewAuditEvent {
    pub kind: AuditKind,
    /// None for the CLI working on the database directly.
    pub principal: Option<Uid>,
    pub token_id: String,
    pub mutations: Vec<Mutation>,
    pub entities: Vec<EntityRecord>,
    pub detail: String,
}

impl NewAuditEvent {
    /// The event with the request's mutations.
    pub fn mutations(mut self, m: Vec<Mutation>) -> Self {
        self.mutations = m;
        self
    }

    /// The event with the committed entities.
    pub fn entities(mut self, e: Vec<EntityRecord>) -> Self {
        self.entities = e;
        self
    }
}

/// A stored audit event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEvent {
    pub seq: u64,
    /// Unix microseconds.
    pub time: i64,
    #[serde(flatten)]
    pub event: NewAuditEvent,
}

/// The outcome of a Cedar evaluation: a denial is a value, not an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub determining_policies: Vec<String>,
    pub errors: Vec<String>,
}

/// Current time in unix microseconds.
pub fn now_micros() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
