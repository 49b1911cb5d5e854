//! The one error type of the use cases. Each variant is a status the contract names;
//! the transport maps them in exactly one place (`grpc::status`).

/// What went wrong with a call. A policy denial is `Denied`: the decision itself is a
/// value (`model::Decision`), and only the use case turns it into this error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Token missing, malformed, badly signed, expired, not yet valid, wrong issuer or
    /// audience, or revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// The token names a key that is not known (possibly not fetched yet from a JWKS).
    #[error("{0}")]
    UnknownKey(String),
    /// A policy denied the action, or the entity does not exist: the two are one answer.
    #[error("{0}")]
    Denied(String),
    /// A denied mutation, explained (only when the server reveals determining policies):
    /// PERMISSION_DENIED with a google.rpc.ErrorInfo naming the mutation and policies.
    #[error("{message}")]
    DeniedExplained { message: String, mutation: usize, policies: Vec<String> },
    /// An `if_version` precondition failed.
    #[error("{0}")]
    Aborted(String),
    /// A create of an entity (or key) that exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Something named by an administrative call does not exist (e.g. a key).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or exceeds a limit.
    #[error("{0}")]
    InvalidArgument(String),
    /// The database cannot be reached: nothing was committed.
    #[error("{0}")]
    Unavailable(String),
    /// The caller's deadline passed before the transaction committed: nothing was committed.
    #[error("deadline exceeded before the transaction committed; nothing was committed")]
    DeadlineExceeded,
    /// A transient conflict (serialization failure, deadlock): the use case is retried;
    /// a caller sees it only as UNAVAILABLE after the retries ran out.
    #[error("transient database conflict: {0}")]
    Retry(String),
    /// The commit's outcome cannot be known (connection lost during COMMIT): UNKNOWN.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// A bug or a corrupt database; the details are logged, not sent.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as S;
        match e {
            S::Unavailable(m) => Error::Unavailable(format!("database unavailable: {m}")),
            // A uniqueness constraint (e.g. a UNIQUE column of a mapped table).
            S::Conflict(m) => Error::AlreadyExists(m),
            S::Retry(m) => Error::Retry(m),
            // The message says what (a value the database or the mapping cannot take).
            S::Invalid(m) => Error::InvalidArgument(m),
            S::Unknown(m) => Error::OutcomeUnknown(m),
            S::Internal(m) => Error::Internal(m),
        }
    }
}
