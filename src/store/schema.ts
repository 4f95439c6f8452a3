// Table types shared by both dialects. Timestamps are ISO-8601 UTC text (sortable, same in SQLite
// and PostgreSQL); binary DER is BLOB / BYTEA; serial numbers are canonical lowercase hex.

import type { ColumnType, Generated, Insertable, Selectable } from 'kysely';

export type CaRole = 'root' | 'intermediate';
export type CaStatus = 'pending' | 'active' | 'retired' | 'revoked';
export type CertificateStatus = 'valid' | 'revoked';

export interface CertificateAuthoritiesTable {
  id: Generated<number>;
  name: string;
  role: CaRole;
  parent_id: number | null;
  status: CaStatus;
  subject: string;
  /** KeyRef as JSON; null for the root, whose key is offline. */
  key_ref: string | null;
  key_algorithm: string;
  /** Hex subject key identifier (of the key, known from the request on). */
  ski: string;
  path_len: number | null;
  certificate_der: Buffer | null;
  csr_der: Buffer | null;
  serial: string | null;
  not_before: string | null;
  not_after: string | null;
  created_at: string;
  updated_at: string;
}

export interface CertificatesTable {
  id: Generated<number>;
  issuer_id: number;
  serial: string;
  profile: string;
  subject: string;
  fingerprint_sha256: string;
  not_before: string;
  not_after: string;
  der: Buffer;
  status: CertificateStatus;
  revoked_at: string | null;
  revocation_reason: string | null;
  requested_by: string;
  created_at: string;
  /** The registry device this certificate identifies, when it is a device certificate. */
  device_udid: string | null;
}

export interface AuditLogTable {
  seq: number;
  at: string;
  actor: string;
  action: string;
  target: string;
  details: string;
  prev_hash: string;
  hash: string;
}

export interface ApiTokensTable {
  id: string;
  name: string;
  scopes: string;
  secret_hash: string;
  created_by: string;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
  last_used_at: string | null;
}

export type DeviceState = 'registered' | 'provisioned' | 'active' | 'suspended' | 'revoked' | 'decommissioned';

export interface TenantsTable { name: string; created_at: string }

export interface ProductsTable {
  id: Generated<number>;
  name: string;
  profile: string;
  validity_days: number;
  created_at: string;
  allow_server_keygen: Generated<number>;
  allow_rekey: Generated<number>;
  renew_after_percent: Generated<number>;
  /** JSON ProductPolicy (src/connect/policy.ts) or null for the default. */
  policy: ColumnType<string | null, string | null | undefined, string | null>;
}

export interface LinesTable {
  id: Generated<number>;
  name: string;
  ca_id: number;
  refused_issuances: Generated<number>;
  created_at: string;
}

export interface BatchesTable {
  id: string;
  product_id: number;
  line_id: number;
  quota: number;
  issued_count: Generated<number>;
  refused_count: Generated<number>;
  allow_unregistered: Generated<number>;
  require_approval: Generated<number>;
  expires_at: string | null;
  created_at: string;
}

export interface VendorsTable { id: Generated<number>; name: string; created_at: string }

export interface VendorCasTable {
  id: Generated<number>;
  vendor_id: number;
  subject: string;
  fingerprint_sha256: string;
  der: Buffer;
  not_after: string;
  created_at: string;
}

export interface DevicesTable {
  udid: string;
  public_key_spki: Buffer;
  public_key_sha256: string;
  serial_number: string | null;
  product_id: number;
  line_id: number;
  batch_id: string;
  tenant: string;
  birth_cert_der: Buffer | null;
  state: DeviceState;
  created_at: string;
  updated_at: string;
  provisioned_at: string | null;
}

export interface ClaimsTable {
  id: string;
  batch_id: string;
  secret_hash: string;
  max_uses: number;
  used: Generated<number>;
  per_minute: number;
  expires_at: string;
  revoked_at: string | null;
  created_by: string;
  created_at: string;
  last_used_at: string | null;
}

export interface EnrolmentApprovalsTable {
  id: string;
  batch_id: string;
  udid: string;
  public_key_sha256: string;
  status: 'pending' | 'approved' | 'rejected' | 'used';
  authenticator: string;
  source: string;
  requested_at: string;
  decided_at: string | null;
  decided_by: string | null;
  reason: string | null;
}

export interface CrlsTable {
  id: Generated<number>;
  ca_id: number;
  number: number;
  kind: 'full' | 'delta';
  base_number: number | null;
  this_update: string;
  next_update: string;
  entries: number;
  der: Buffer;
  created_at: string;
}

export interface WebhooksTable {
  id: string;
  url: string;
  secret: string;
  /** Space-separated event names. */
  events: string;
  created_by: string;
  created_at: string;
  disabled_at: string | null;
}

export interface WebhookDeliveriesTable {
  id: Generated<number>;
  webhook_id: string;
  audit_seq: number | null;
  event: string;
  payload: string;
  status: 'pending' | 'delivered' | 'failed';
  attempts: Generated<number>;
  next_attempt_at: string;
  last_status: number | null;
  last_error: string | null;
  created_at: string;
  delivered_at: string | null;
}

export interface CursorsTable { name: string; value: string; updated_at: string }

export interface ClaimUsesTable { claim_id: string; udid: string; at: string }

export interface StampRunsTable {
  id: string;
  batch_id: string;
  requested: number;
  /** Comma-separated format names (json, tlv, nvs). */
  formats: string;
  out_dir: string;
  encrypt_to: string | null;
  status: 'running' | 'complete';
  created_by: string;
  created_at: string;
  completed_at: string | null;
  /**
   * Encrypted runs: the archive file (name in out_dir) and its SHA-256 (hex), recorded once the archive
   * is complete and synced but before it is renamed into place (migration 0009). Null until then.
   */
  archive_name: ColumnType<string | null, string | null | undefined, string | null>;
  archive_sha256: ColumnType<string | null, string | null | undefined, string | null>;
  /** The process making the run: `host pid token` (migration 0009); null once none is. */
  owner: ColumnType<string | null, string | null | undefined, string | null>;
  /** When the owner last committed a chunk (ISO 8601). */
  heartbeat_at: ColumnType<string | null, string | null | undefined, string | null>;
}

export interface StampsTable {
  udid: string;
  run_id: string;
  batch_id: string;
  seq: number;
  certificate_serial: string;
  pending: Buffer | null;
  written_at: string | null;
  flashed_at: string | null;
  created_at: string;
}

export interface StationsTable {
  id: string;
  ca_id: number;
  line_id: number;
  batch_id: string;
  status: 'pending' | 'active';
  quota: number;
  valid_until: string;
  /** RFC 7512 URI of the sub-CA key in the factory's token (no PIN, no module path). */
  key_uri: string;
  /** The DN every device certificate of the station starts with (then CN=UDID); its name constraint. */
  subject_base: string;
  device_validity_days: number;
  registered_only: Generated<number>;
  imported_count: Generated<number>;
  refused_count: Generated<number>;
  last_seq: Generated<number>;
  last_import_at: string | null;
  created_by: string;
  created_at: string;
  installed_at: string | null;
}

export interface StationEntriesTable {
  station_id: string;
  seq: number;
  serial: string;
  fingerprint_sha256: string;
  udid: string;
  /** When the station signed it (the journal entry's `at`). */
  signed_at: string;
  imported_at: string;
}

export interface Database {
  certificate_authorities: CertificateAuthoritiesTable;
  certificates: CertificatesTable;
  audit_log: AuditLogTable;
  api_tokens: ApiTokensTable;
  tenants: TenantsTable;
  products: ProductsTable;
  lines: LinesTable;
  batches: BatchesTable;
  vendors: VendorsTable;
  vendor_cas: VendorCasTable;
  devices: DevicesTable;
  claims: ClaimsTable;
  claim_uses: ClaimUsesTable;
  enrolment_approvals: EnrolmentApprovalsTable;
  crls: CrlsTable;
  webhooks: WebhooksTable;
  webhook_deliveries: WebhookDeliveriesTable;
  cursors: CursorsTable;
  stamp_runs: StampRunsTable;
  stamps: StampsTable;
  stations: StationsTable;
  station_entries: StationEntriesTable;
}

export type DeviceRow = Selectable<DevicesTable>;
export type BatchRow = Selectable<BatchesTable>;

export type CaRow = Selectable<CertificateAuthoritiesTable>;
export type NewCaRow = Insertable<CertificateAuthoritiesTable>;
export type CertificateRow = Selectable<CertificatesTable>;
export type NewCertificateRow = Insertable<CertificatesTable>;
export type AuditRow = Selectable<AuditLogTable>;
export type TokenRow = Selectable<ApiTokensTable>;
export type ClaimRow = Selectable<ClaimsTable>;
export type ProductRow = Selectable<ProductsTable>;
export type StationRow = Selectable<StationsTable>;
