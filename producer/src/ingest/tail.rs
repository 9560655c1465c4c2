//! The rows as the ledger records them, written by the parser and read by the ledger
//! at the same time: a batch is recorded while it is validated, not after.
//!
//! The parser's thread writes the COPY-format rows ([`spillway_ledger::copy`]) to a
//! temporary file through a [`TailWriter`], which announces how far the file is written
//! each time it is flushed; a [`TailReader`] follows it, reading what is written with
//! positioned reads (its handle shares no offset with the writer's), waiting when it
//! has caught up, and ending when the writer says the rows are complete. Neither side
//! holds more than a chunk in memory, and neither waits for the other: a slow ledger
//! leaves rows on disk, not in memory, and never slows the upload down. A writer
//! dropped before it completes (the upload was refused) ends the reader with an
//! error, so the ledger's transaction is rolled back.

use std::{
    fs::File,
    io::{self, Write},
    os::unix::fs::FileExt,
    path::Path,
    sync::Arc,
};

use bytes::Bytes;
use tokio::{
    io::AsyncRead,
    sync::{oneshot, watch},
};
use tokio_util::io::StreamReader;

/// Most bytes read from the file in one piece.
const CHUNK_BYTES: u64 = 256 * 1024;

/// How far the file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// This many bytes so far; more to come.
    Growing(u64),
    /// All of it.
    Complete(u64),
}

/// The parser's side: the file, the count of bytes written to it, and the header.
pub struct TailWriter {
    file: File,
    written: u64,
    progress: watch::Sender<Written>,
    header: Option<oneshot::Sender<Vec<String>>>,
}

/// The ledger's side.
pub struct TailReader {
    file: Arc<File>,
    progress: watch::Receiver<Written>,
    header: oneshot::Receiver<Vec<String>>,
}

/// A new temporary file in `dir`, with its two sides.
pub fn pair(dir: &Path) -> io::Result<(TailWriter, TailReader)> {
    let file = tempfile::tempfile_in(dir)?;
    let reading = file.try_clone()?;
    let (progress, following) = watch::channel(Written::Growing(0));
    let (header, header_rx) = oneshot::channel();
    Ok((
        TailWriter {
            file,
            written: 0,
            progress,
            header: Some(header),
        },
        TailReader {
            file: Arc::new(reading),
            progress: following,
            header: header_rx,
        },
    ))
}

impl TailWriter {
    /// Hands the batch's header to the reader, once it is read from the upload.
    pub fn header(&mut self, header: &[String]) {
        if let Some(sender) = self.header.take() {
            // A reader that is gone has nothing to record.
            let _ = sender.send(header.to_vec());
        }
    }

    /// Every row is written: the reader reads to the end, then ends.
    pub fn complete(self) {
        self.progress.send_replace(Written::Complete(self.written));
    }
}

impl Write for TailWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    /// What is written is in the file: the reader may read it.
    fn flush(&mut self) -> io::Result<()> {
        self.progress.send_replace(Written::Growing(self.written));
        Ok(())
    }
}

impl TailReader {
    /// The batch's header, or `None` if the upload ended before one was read.
    pub async fn header(&mut self) -> Option<Vec<String>> {
        (&mut self.header).await.ok()
    }

    /// The rows, as they are written, to their end.
    pub fn rows(self) -> impl AsyncRead + Unpin + Send {
        let chunks =
            futures_util::stream::try_unfold((self, 0u64), |(mut tail, offset)| async move {
                loop {
                    let written = *tail.progress.borrow_and_update();
                    let (available, complete) = match written {
                        Written::Growing(n) => (n, false),
                        Written::Complete(n) => (n, true),
                    };
                    if offset < available {
                        let len = (available - offset).min(CHUNK_BYTES);
                        let file = Arc::clone(&tail.file);
                        let chunk = tokio::task::spawn_blocking(move || {
                            let mut chunk = vec![0; len as usize];
                            file.read_exact_at(&mut chunk, offset).map(|()| chunk)
                        })
                        .await
                        .map_err(io::Error::other)??;
                        return Ok(Some((Bytes::from(chunk), (tail, offset + len))));
                    }
                    if complete {
                        return Ok(None);
                    }
                    if tail.progress.changed().await.is_err() {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the upload was refused before its rows were complete",
                        ));
                    }
                }
            });
        StreamReader::new(Box::pin(chunks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_reader_follows_the_writer_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, mut reader) = pair(dir.path()).unwrap();
        let writing = tokio::task::spawn_blocking(move || {
            writer.header(&["n".into()]);
            for i in 0..1000 {
                writeln!(writer, "row {i}").unwrap();
                if i % 100 == 0 {
                    writer.flush().unwrap();
                }
            }
            writer.complete();
        });
        assert_eq!(reader.header().await, Some(vec!["n".to_string()]));
        let mut read = String::new();
        reader.rows().read_to_string(&mut read).await.unwrap();
        writing.await.unwrap();
        let expected: String = (0..1000).map(|i| format!("row {i}\n")).collect();
        assert_eq!(read, expected);
    }

    #[tokio::test]
    async fn a_writer_dropped_before_it_completes_fails_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, reader) = pair(dir.path()).unwrap();
        writer.write_all(b"half a batch\n").unwrap();
        writer.flush().unwrap();
        drop(writer);
        let mut read = Vec::new();
        let error = reader.rows().read_to_end(&mut read).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(read, b"half a batch\n", "what was written is read first");
    }
}
