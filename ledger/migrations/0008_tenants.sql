-- The tenant each batch belongs to: a submitter sees and acts on its own tenant's
-- batches only. Batches recorded before tenants existed belong to `default`.
ALTER TABLE batches ADD COLUMN tenant text NOT NULL DEFAULT 'default';

CREATE INDEX batches_by_tenant ON batches (tenant, received_at DESC, batch_id);
