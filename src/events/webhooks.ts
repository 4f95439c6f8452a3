// Webhooks: fleet systems subscribe a URL to events (issued, revoked, expiring, quota-exceeded,
// clone-detected). This file is the store side: subscriptions (create / list / disable, audited),
// deliveries (list, retry), the mapping from audit entries to events, and the signature.
// The dispatcher (dispatcher.ts) turns audit entries into deliveries and sends them.
//
// The secret is the HMAC key of the signature. It is returned once, by createWebhook, and never logged
// nor written to the audit log.

import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Selectable, Transaction } from 'kysely';
import { appendAudit, type AuditEntry } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { nowIso, type Store } from '../store/database.js';
import type { Database, WebhookDeliveriesTable } from '../store/schema.js';

export const WEBHOOK_EVENTS = ['issued', 'revoked', 'expiring', 'quota-exceeded', 'clone-detected'] as const;
export type WebhookEvent = (typeof WEBHOOK_EVENTS)[number];
export type DeliveryStatus = 'pending' | 'delivered' | 'failed';
export const DELIVERY_STATUSES: readonly DeliveryStatus[] = ['pending', 'delivered', 'failed'];

/** The dispatcher's position in the audit log: the last seq turned into deliveries. */
export const AUDIT_CURSOR = 'webhooks.audit_seq';
/** Per webhook: the expiring certificates already announced to it (see dispatcher.ts). */
export const expiringCursorName = (webhookId: string): string => `webhooks.expiring:${webhookId}`;

export const WEBHOOK_ID_PATTERN = '^wh_[0-9a-f]{16}$';
const MAX_URL_LENGTH = 2048;

export function parseEvents(input: string | readonly string[]): WebhookEvent[] {
  const names = (typeof input === 'string' ? input.split(/[\s,]+/) : input.flatMap((s) => s.split(/[\s,]+/))).filter(Boolean);
  if (names.length === 0) throw new HallmarkError('BAD_REQUEST', `name one or more events (${WEBHOOK_EVENTS.join(', ')})`);
  for (const n of names) {
    if (!(WEBHOOK_EVENTS as readonly string[]).includes(n)) throw new HallmarkError('BAD_REQUEST', `unknown event ${JSON.stringify(n)} (one of ${WEBHOOK_EVENTS.join(', ')})`);
  }
  return WEBHOOK_EVENTS.filter((e) => names.includes(e));
}

/** http(s) only, no credentials in the URL (they would be shown in lists and the audit log). */
export function checkWebhookUrl(text: string): string {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new HallmarkError('BAD_REQUEST', `not a URL: ${JSON.stringify(text.slice(0, 100))}`);
  }
  if (text.length > MAX_URL_LENGTH) throw new HallmarkError('BAD_REQUEST', `the URL is longer than ${MAX_URL_LENGTH} characters`);
  if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new HallmarkError('BAD_REQUEST', 'a webhook URL must be http:// or https://');
  if (url.username || url.password) throw new HallmarkError('BAD_REQUEST', 'a webhook URL must not carry credentials (the signature authenticates Hallmark to the receiver)');
  url.hash = '';
  return url.toString();
}

/** The URL as it may appear in a log line: origin and path, no query (it might carry a receiver's token). */
export const urlForLog = (url: string): string => {
  try { const u = new URL(url); return `${u.origin}${u.pathname}`; } catch { return '?'; }
};

// ------------------------------------------------------------------ signature

/** "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>" */
export function signatureHeader(secret: string, body: string, at = new Date()): string {
  const t = Math.floor(at.getTime() / 1000);
  return `t=${t},v1=${createHmac('sha256', secret).update(`${t}.${body}`).digest('hex')}`;
}

/**
 * A receiver's check (also used by the tests): the header's v1 matches the body under the secret, and
 * its timestamp is within `toleranceSeconds` of now (a replayed old request is refused).
 */
export function verifySignature(secret: string, body: string, header: string | undefined, options: { toleranceSeconds?: number; now?: Date } = {}): boolean {
  if (!header) return false;
  const parts = new Map(header.split(',').map((p) => { const i = p.indexOf('='); return [p.slice(0, i).trim(), p.slice(i + 1).trim()] as const; }));
  const t = Number(parts.get('t'));
  const v1 = parts.get('v1');
  if (!Number.isInteger(t) || !v1 || !/^[0-9a-f]{64}$/.test(v1)) return false;
  const now = Math.floor((options.now ?? new Date()).getTime() / 1000);
  if (Math.abs(now - t) > (options.toleranceSeconds ?? 300)) return false;
  const expected = createHmac('sha256', secret).update(`${t}.${body}`).digest();
  return timingSafeEqual(expected, Buffer.from(v1, 'hex'));
}

// ------------------------------------------------------------------ subscriptions

export interface CreatedWebhook { readonly id: string; readonly url: string; readonly events: WebhookEvent[]; readonly secret: string; readonly createdAt: string }

export interface WebhookInfo {
  readonly id: string;
  readonly url: string;
  readonly events: WebhookEvent[];
  readonly status: 'active' | 'disabled';
  readonly createdBy: string;
  readonly createdAt: string;
  readonly disabledAt: string | null;
  readonly deliveries: Record<DeliveryStatus, number>;
}

export async function createWebhook(store: Store, options: { url: string; events: string | readonly string[]; actor: string }): Promise<CreatedWebhook> {
  const url = checkWebhookUrl(options.url);
  const events = parseEvents(options.events);
  const id = `wh_${randomBytes(8).toString('hex')}`;
  const secret = `whsec_${randomBytes(32).toString('base64url')}`;
  const createdAt = nowIso();
  await store.writeTransaction(async (trx) => {
    // The first active webhook starts the dispatcher's cursor here: history is never replayed to it.
    const others = await trx.selectFrom('webhooks').select('id').where('disabled_at', 'is', null).limit(1).execute();
    await trx.insertInto('webhooks').values({ id, url, secret, events: events.join(' '), created_by: options.actor, created_at: createdAt, disabled_at: null }).execute();
    await appendAudit(trx, [{ actor: options.actor, action: 'webhook.create', target: id, details: { url: urlForLog(url), events } }]);
    if (others.length === 0) await setCursor(trx, AUDIT_CURSOR, String(await auditHead(trx)));
  });
  return { id, url, events, secret, createdAt };
}

export async function disableWebhook(store: Store, id: string, actor: string): Promise<WebhookInfo> {
  await store.writeTransaction(async (trx) => {
    const row = await trx.selectFrom('webhooks').select(['disabled_at']).where('id', '=', id).executeTakeFirst();
    if (!row) throw new HallmarkError('NOT_FOUND', `no webhook ${id}`);
    if (row.disabled_at) throw new HallmarkError('ILLEGAL_TRANSITION', `webhook ${id} is already disabled (since ${row.disabled_at})`);
    const now = nowIso();
    await trx.updateTable('webhooks').set({ disabled_at: now }).where('id', '=', id).execute();
    // What was still waiting will not be sent: visible as failed, and `retry` refuses it.
    const r = await trx.updateTable('webhook_deliveries').set({ status: 'failed', last_error: 'webhook disabled' }).where('webhook_id', '=', id).where('status', '=', 'pending').executeTakeFirst();
    await appendAudit(trx, [{ actor, action: 'webhook.disable', target: id, details: { pendingDropped: Number(r.numUpdatedRows) } }]);
  });
  return (await listWebhooks(store, { id }))[0]!;
}

export async function listWebhooks(store: Store, options: { id?: string } = {}): Promise<WebhookInfo[]> {
  let q = store.db.selectFrom('webhooks').select(['id', 'url', 'events', 'created_by', 'created_at', 'disabled_at']);
  if (options.id) q = q.where('id', '=', options.id);
  const rows = await q.orderBy('created_at').orderBy('id').execute();
  let cq = store.db.selectFrom('webhook_deliveries').select(['webhook_id', 'status', (eb) => eb.fn.countAll().as('n')]);
  if (options.id) cq = cq.where('webhook_id', '=', options.id);
  const counts = await cq.groupBy(['webhook_id', 'status']).execute();
  return rows.map((r) => {
    const deliveries: Record<DeliveryStatus, number> = { pending: 0, delivered: 0, failed: 0 };
    for (const c of counts) if (c.webhook_id === r.id) deliveries[c.status] = Number(c.n);
    return {
      id: r.id, url: r.url, events: r.events.split(' ').filter(Boolean) as WebhookEvent[], status: r.disabled_at ? 'disabled' as const : 'active' as const,
      createdBy: r.created_by, createdAt: r.created_at, disabledAt: r.disabled_at, deliveries,
    };
  });
}

// ------------------------------------------------------------------ deliveries

export interface DeliveryInfo {
  readonly id: number;
  readonly webhook: string;
  readonly event: WebhookEvent;
  readonly auditSeq: number | null;
  readonly status: DeliveryStatus;
  readonly attempts: number;
  readonly nextAttemptAt: string | null;
  readonly lastStatus: number | null;
  readonly lastError: string | null;
  readonly createdAt: string;
  readonly deliveredAt: string | null;
  /** The body as sent: {id, event, at, data}. */
  readonly payload: WebhookBody;
}

export interface WebhookBody { readonly id: string; readonly event: WebhookEvent; readonly at: string; readonly data: Record<string, unknown> }

export async function listDeliveries(store: Store, options: { webhook?: string; status?: DeliveryStatus; event?: WebhookEvent; limit?: number; before?: number } = {}): Promise<DeliveryInfo[]> {
  if (options.status && !DELIVERY_STATUSES.includes(options.status)) throw new HallmarkError('BAD_REQUEST', `unknown status ${JSON.stringify(options.status)} (one of ${DELIVERY_STATUSES.join(', ')})`);
  if (options.webhook && !(await store.db.selectFrom('webhooks').select('id').where('id', '=', options.webhook).executeTakeFirst())) {
    throw new HallmarkError('NOT_FOUND', `no webhook ${options.webhook}`);
  }
  let q = store.db.selectFrom('webhook_deliveries').selectAll();
  if (options.webhook) q = q.where('webhook_id', '=', options.webhook);
  if (options.status) q = q.where('status', '=', options.status);
  if (options.event) q = q.where('event', '=', options.event);
  if (options.before) q = q.where('id', '<', options.before);
  const rows = await q.orderBy('id', 'desc').limit(Math.max(1, Math.min(options.limit ?? 50, 1000))).execute();
  return rows.map(deliveryInfo);
}

export async function getDelivery(store: Store, id: number): Promise<DeliveryInfo> {
  const row = await store.db.selectFrom('webhook_deliveries').selectAll().where('id', '=', id).executeTakeFirst();
  if (!row) throw new HallmarkError('NOT_FOUND', `no webhook delivery ${id}`);
  return deliveryInfo(row);
}

function deliveryInfo(r: Selectable<WebhookDeliveriesTable>): DeliveryInfo {
  return {
    id: Number(r.id), webhook: r.webhook_id, event: r.event as WebhookEvent, auditSeq: r.audit_seq === null ? null : Number(r.audit_seq), status: r.status,
    attempts: Number(r.attempts), nextAttemptAt: r.status === 'pending' ? r.next_attempt_at : null, lastStatus: r.last_status === null ? null : Number(r.last_status),
    lastError: r.last_error, createdAt: r.created_at, deliveredAt: r.delivered_at, payload: JSON.parse(r.payload) as WebhookBody,
  };
}

/**
 * Sends a delivery again, now, with a fresh series of attempts (a failed one, or a delivered one the
 * receiver lost). Not audited (deliveries are not); the webhook must be active.
 */
export async function retryDelivery(store: Store, id: number): Promise<DeliveryInfo> {
  await store.writeTransaction(async (trx) => {
    const row = await trx.selectFrom('webhook_deliveries').innerJoin('webhooks', 'webhooks.id', 'webhook_deliveries.webhook_id')
      .select(['webhook_deliveries.webhook_id', 'webhooks.disabled_at']).where('webhook_deliveries.id', '=', id).executeTakeFirst();
    if (!row) throw new HallmarkError('NOT_FOUND', `no webhook delivery ${id}`);
    if (row.disabled_at) throw new HallmarkError('ILLEGAL_TRANSITION', `webhook ${row.webhook_id} is disabled: its deliveries are not sent`);
    await trx.updateTable('webhook_deliveries').set({ status: 'pending', attempts: 0, next_attempt_at: nowIso(), delivered_at: null }).where('id', '=', id).execute();
  });
  return getDelivery(store, id);
}

// ------------------------------------------------------------------ cursors

export async function readCursor(db: Store['db'] | Transaction<Database>, name: string): Promise<string | undefined> {
  return (await db.selectFrom('cursors').select('value').where('name', '=', name).executeTakeFirst())?.value;
}

export async function setCursor(trx: Transaction<Database>, name: string, value: string): Promise<void> {
  const now = nowIso();
  const r = await trx.updateTable('cursors').set({ value, updated_at: now }).where('name', '=', name).executeTakeFirst();
  if (Number(r.numUpdatedRows) === 0) await trx.insertInto('cursors').values({ name, value, updated_at: now }).execute();
}

export async function auditHead(db: Store['db'] | Transaction<Database>): Promise<number> {
  const row = await db.selectFrom('audit_log').select('seq').orderBy('seq', 'desc').limit(1).executeTakeFirst();
  return row ? Number(row.seq) : 0;
}

// ------------------------------------------------------------------ audit entries -> events

const pick = (details: Record<string, unknown>, keys: readonly string[]): Record<string, unknown> =>
  Object.fromEntries(keys.filter((k) => details[k] !== undefined).map((k) => [k, details[k]]));

/**
 * The event an audit entry announces, with its data, or undefined. The data are the entry's own facts
 * (never a secret: audit details never hold one).
 */
export function eventOfAuditEntry(entry: Pick<AuditEntry, 'seq' | 'at' | 'actor' | 'action' | 'target' | 'details'>): { event: WebhookEvent; data: Record<string, unknown> } | undefined {
  const d = entry.details;
  switch (entry.action) {
    case 'certificate.issue':
      return { event: 'issued', data: { serial: entry.target, ...pick(d, ['issuer', 'profile', 'subject', 'notAfter', 'fingerprintSha256', 'device', 'batch', 'line', 'firstIdentity']), actor: entry.actor } };
    case 'certificate.revoke':
      return { event: 'revoked', data: { kind: 'certificate', serial: entry.target, ...pick(d, ['issuer', 'reason', 'device', 'by']), actor: entry.actor } };
    case 'device.revoke':
      return { event: 'revoked', data: { kind: 'device', device: entry.target, reason: d.reason ?? 'unspecified', ...pick(d, ['from', 'certificatesRevoked']), actor: entry.actor } };
    case 'device.decommission':
      return { event: 'revoked', data: { kind: 'device', device: entry.target, reason: 'cessationOfOperation', decommissioned: true, ...pick(d, ['from', 'certificatesRevoked']), actor: entry.actor } };
    case 'issuance.quota_exceeded':
      return { event: 'quota-exceeded', data: { device: entry.target, ...pick(d, ['batch', 'reason']), actor: entry.actor } };
    case 'device.clone_refused':
      return { event: 'clone-detected', data: { device: entry.target, ...pick(d, ['batch', 'existingUdid', 'existingBatch', 'reason', 'source']), actor: entry.actor } };
    case 'issuance.refused':
      // A certificate asked for with the key of another device (issueForDevice) is refused as a clone.
      if (d.code === 'CLONE_DETECTED') return { event: 'clone-detected', data: { device: entry.target, ...pick(d, ['batch', 'reason']), source: 'issuance', actor: entry.actor } };
      return undefined;
    default:
      return undefined;
  }
}
