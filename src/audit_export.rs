//! Audit export files: the events retention drops, written first as gzip-compressed JSON
//! lines, one file per batch, `audit-<first seq>-<last seq>.jsonl.gz` (20 digits each, so
//! that names sort in seq order). A file is written to a temporary name, synced, renamed
//! and its directory synced before any of its events is dropped from the database.

use crate::model::AuditEvent;
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory the files go to (one per database).
#[derive(Clone, Debug)]
pub struct AuditExport {
    pub dir: PathBuf,
}

impl AuditExport {
    /// Creates the directory when missing and checks it can be written.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let probe = dir.join(".lockstep-write-probe");
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// Writes `events` (in seq order) as one file and makes it durable; a file of an
    /// earlier attempt that starts at the same seq (its events were not dropped: the
    /// database's mark decides) is replaced, so no event is exported twice.
    pub fn write(&self, events: &[AuditEvent]) -> std::io::Result<PathBuf> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Err(std::io::Error::other("no events to export"));
        };
        let prefix = format!("audit-{:020}-", first.seq);
        let name = format!("{prefix}{:020}.jsonl.gz", last.seq);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        {
            let file = std::fs::File::create(&tmp)?;
            let mut gz = GzEncoder::new(std::io::BufWriter::new(file), Compression::fast());
            for e in events {
                serde_json::to_writer(&mut gz, e).map_err(std::io::Error::other)?;
                gz.write_all(b"\n")?;
            }
            let file = gz.finish()?.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let other = entry.file_name().to_string_lossy().into_owned();
            if other.starts_with(&prefix) && other.ends_with(".jsonl.gz") && other != name {
                std::fs::remove_file(entry.path())?;
            }
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }
}
