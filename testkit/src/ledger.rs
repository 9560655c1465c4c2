//! Batches put in the ledger as the producer puts them there, for the tests and
//! benchmarks that start from rows already recorded.

use spillway_ledger::{Ledger, NewBatch, copy::RowsEncoder};

/// Records `batch` with `rows` (each its file line and fields) as the producer does
/// before publishing: the rows with `COPY`, all in one transaction. The batch is left
/// `publishing`.
pub async fn record_batch<R, F, S>(ledger: &Ledger, batch: &NewBatch<'_>, rows: R)
where
    R: IntoIterator<Item = (u64, F)>,
    F: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut encoder =
        RowsEncoder::new(Vec::new(), batch.batch_id).expect("a buffer takes the header");
    for (line, fields) in rows {
        let fields: Vec<S> = fields.into_iter().collect();
        encoder
            .push(line, fields.iter().map(AsRef::as_ref))
            .expect("encode a row");
    }
    let encoded = encoder.finish().expect("the encoded rows");
    ledger
        .create_batch(batch, encoded.as_slice())
        .await
        .unwrap_or_else(|e| panic!("cannot record batch {}: {e}", batch.batch_id));
}

/// [`record_batch`], then every row confirmed: the batch is `queued`.
pub async fn record_published_batch<R, F, S>(ledger: &Ledger, batch: &NewBatch<'_>, rows: R)
where
    R: IntoIterator<Item = (u64, F)>,
    F: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    record_batch(ledger, batch, rows).await;
    ledger
        .finish_publishing(batch.batch_id)
        .await
        .unwrap_or_else(|e| panic!("cannot mark batch {} published: {e}", batch.batch_id));
}
