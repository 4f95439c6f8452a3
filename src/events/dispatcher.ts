// The webhook dispatcher: turns audit entries into deliveries and sends them.
//
//   collect  — reads the audit log after its cursor (cursors row 'webhooks.audit_seq'), creates one
//              delivery per matching active webhook and advances the cursor, all in one write
//              transaction: the store's write lock makes one dispatcher at a time advance it, so several
//              server processes on one store never create a delivery twice, and a restart resumes where
//              the last commit left off. Events are read from the audit log because it is durable,
//              ordered and holds what every process did (the CLI, other servers).
//   expiring — a periodic scan (default every hour; per webhook, remembered in the store so restarts do
//              not rescan) for valid device certificates expiring within N days (default 30) that were
//              not announced to that webhook yet.
//   send     — POSTs due deliveries (signed, 5 s timeout), records the answer, and retries failures
//              with exponential backoff until the schedule is exhausted, then marks them failed.
//
// Delivery is at least once: a process that dies between sending and recording sends again after the
// lease (timeout + 60 s). Receivers deduplicate with the body's id.

import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { nowIso, type Store } from '../store/database.js';
import { AUDIT_CURSOR, auditHead, eventOfAuditEntry, expiringCursorName, readCursor, setCursor, signatureHeader, urlForLog, type WebhookBody, type WebhookEvent } from './webhooks.js';

/** Delay before attempt n+1 after n failed attempts: about a day in all, then the delivery is failed. */
export const DEFAULT_BACKOFF_MS: readonly number[] = [10e3, 60e3, 5 * 60e3, 30 * 60e3, 3600e3, 2 * 3600e3, 4 * 3600e3, 8 * 3600e3, 8 * 3600e3];
export const DEFAULT_TIMEOUT_MS = 5000;
export const DEFAULT_EXPIRING_WITHIN_DAYS = 30;
export const DEFAULT_EXPIRING_SCAN_MS = 3600e3;
const DAY_MS = 86400e3;
const LEASE_EXTRA_MS = 60e3;
const MAX_ERROR_LENGTH = 500;

export interface DispatcherLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
}

export interface WebhookDispatcherOptions {
  /** false: startWebhookDispatcher starts nothing. Default true. */
  readonly enabled?: boolean;
  /** How often new audit entries and due deliveries are looked for (ms). Default 1000. */
  readonly pollMs?: number;
  /** How often each webhook's expiring scan runs (ms). Default 1 h. */
  readonly expiringScanMs?: number;
  /** Certificates expiring within this many days are announced. Default 30. */
  readonly expiringWithinDays?: number;
  /** Delays between attempts; attempts = length + 1. Default 10 s, 1 min, 5 min, 30 min, 1 h, 2 h, 4 h, 8 h, 8 h. */
  readonly backoffMs?: readonly number[];
  /** Per request (connect, send, answer). Default 5000. */
  readonly timeoutMs?: number;
  /** Audit entries per transaction, deliveries per send round. Default 500 / 50. */
  readonly batchSize?: number;
  /** Requests in flight at once. Default 8. */
  readonly concurrency?: number;
  readonly logger?: DispatcherLogger;
}

interface ActiveHook { readonly id: string; readonly events: readonly string[] }

interface DueDelivery { readonly id: number; readonly webhook_id: string; readonly event: string; readonly payload: string; readonly attempts: number; readonly url: string; readonly secret: string }

interface Outcome { readonly delivery: DueDelivery; readonly status: number | null; readonly error: string | null }

interface ExpiringCursor { readonly notAfter: string; readonly certificateId: number; readonly scannedAt: string }

export class WebhookDispatcher {
  readonly #store: Store;
  readonly #pollMs: number;
  readonly #scanMs: number;
  readonly #withinMs: number;
  readonly #backoff: readonly number[];
  readonly #timeoutMs: number;
  readonly #batch: number;
  readonly #concurrency: number;
  readonly #log: DispatcherLogger | undefined;
  readonly #abort = new AbortController();
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #stopped = false;
  #lastExpiringCheck = 0;

  constructor(store: Store, options: WebhookDispatcherOptions = {}) {
    this.#store = store;
    this.#pollMs = options.pollMs ?? 1000;
    this.#scanMs = options.expiringScanMs ?? DEFAULT_EXPIRING_SCAN_MS;
    this.#withinMs = (options.expiringWithinDays ?? DEFAULT_EXPIRING_WITHIN_DAYS) * DAY_MS;
    this.#backoff = options.backoffMs ?? DEFAULT_BACKOFF_MS;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#batch = options.batchSize ?? 500;
    this.#concurrency = Math.max(1, options.concurrency ?? 8);
    this.#log = options.logger;
  }

  /** Attempts a delivery gets before it is failed. */
  get maxAttempts(): number { return this.#backoff.length + 1; }

  start(): this {
    const loop = (): void => {
      if (this.#stopped) return;
      this.#running = this.runOnce()
        .catch((err: unknown) => this.#log?.warn({ err: describeError(err) }, 'webhook dispatcher round failed'))
        .finally(() => {
          this.#running = undefined;
          if (!this.#stopped) this.#timer = setTimeout(loop, this.#pollMs);
        });
    };
    this.#timer = setTimeout(loop, 0);
    return this;
  }

  /** Stops the timer, abandons requests in flight (sent again after their lease) and waits for the round to end. */
  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#abort.abort();
    await this.#running;
  }

  /** One round: new audit entries, the expiring scan when due, due deliveries. */
  async runOnce(): Promise<void> {
    await this.collect();
    if (Date.now() - this.#lastExpiringCheck >= Math.min(this.#scanMs, 60e3)) {
      this.#lastExpiringCheck = Date.now();
      await this.scanExpiring();
    }
    if (!this.#stopped) await this.send();
  }

  async #activeHooks(db: Store['db'] = this.#store.db): Promise<ActiveHook[]> {
    const rows = await db.selectFrom('webhooks').select(['id', 'events']).where('disabled_at', 'is', null).execute();
    return rows.map((r) => ({ id: r.id, events: r.events.split(' ') }));
  }

  /** Turns audit entries after the cursor into deliveries. Returns how many deliveries were created. */
  async collect(): Promise<number> {
    // Idle cost: two small reads, no write lock.
    if ((await this.#activeHooks()).length === 0) return 0;
    const cursor = await readCursor(this.#store.db, AUDIT_CURSOR);
    if (cursor !== undefined && Number(cursor) >= (await auditHead(this.#store.db))) return 0;
    let created = 0;
    for (;;) {
      const round = await this.#store.writeTransaction(async (trx) => {
        const current = await readCursor(trx, AUDIT_CURSOR);
        if (current === undefined) {
          // First run: start at the head, history is not replayed.
          await setCursor(trx, AUDIT_CURSOR, String(await auditHead(trx)));
          return { n: 0, more: false };
        }
        const after = Number(current);
        const entries = await trx.selectFrom('audit_log').select(['seq', 'at', 'actor', 'action', 'target', 'details']).where('seq', '>', after).orderBy('seq').limit(this.#batch).execute();
        if (entries.length === 0) return { n: 0, more: false };
        const hooks = await this.#activeHooks(trx);
        // A webhook gets the events after its own creation only.
        const since = new Map<string, number>();
        if (hooks.length > 0) {
          const created = await trx.selectFrom('audit_log').select(['seq', 'target']).where('action', '=', 'webhook.create').where('target', 'in', hooks.map((h) => h.id)).execute();
          for (const c of created) since.set(c.target, Number(c.seq));
        }
        const now = nowIso();
        const rows = [];
        for (const raw of entries) {
          const seq = Number(raw.seq);
          const mapped = eventOfAuditEntry({ ...raw, seq, details: safeJson(raw.details) });
          if (!mapped) continue;
          const body: WebhookBody = { id: `evt_${seq}`, event: mapped.event, at: raw.at, data: { ...mapped.data, auditSeq: seq } };
          const payload = JSON.stringify(body);
          for (const h of hooks) {
            if (!h.events.includes(mapped.event) || seq <= (since.get(h.id) ?? 0)) continue;
            rows.push({ webhook_id: h.id, audit_seq: seq, event: mapped.event, payload, status: 'pending' as const, attempts: 0, next_attempt_at: now, last_status: null, last_error: null, created_at: now, delivered_at: null });
          }
        }
        for (let i = 0; i < rows.length; i += 200) await trx.insertInto('webhook_deliveries').values(rows.slice(i, i + 200)).execute();
        await setCursor(trx, AUDIT_CURSOR, String(entries[entries.length - 1]!.seq));
        return { n: rows.length, more: entries.length === this.#batch };
      });
      created += round.n;
      if (!round.more || this.#stopped) return created;
    }
  }

  /**
   * For each active webhook subscribed to 'expiring' whose scan is due (or all with force): one delivery
   * per valid device certificate that expires within the window and was not announced to it. Its
   * cursor remembers the end of the window announced (notAfter) and the last certificate id seen:
   * a certificate is new to the webhook when it expires after that window or was recorded after that scan.
   */
  async scanExpiring(options: { force?: boolean; now?: Date } = {}): Promise<number> {
    const hooks = (await this.#activeHooks()).filter((h) => h.events.includes('expiring'));
    let created = 0;
    for (const hook of hooks) {
      if (this.#stopped) break;
      const now = options.now ?? new Date();
      const name = expiringCursorName(hook.id);
      const before = await readCursor(this.#store.db, name);
      const cursor = before === undefined ? undefined : (safeJson(before) as unknown as ExpiringCursor);
      if (!options.force && cursor && now.getTime() - Date.parse(cursor.scannedAt) < this.#scanMs) continue;
      const until = nowIso(new Date(now.getTime() + this.#withinMs));
      // The reads run outside the write lock (a scan over the certificates may take a while). Writers are
      // serialised, so committed certificate ids form a prefix: everything up to maxId is visible now.
      const maxId = Number((await this.#store.db.selectFrom('certificates').select((eb) => eb.fn.max('id').as('m')).executeTakeFirst())?.m ?? 0);
      let q = this.#store.db.selectFrom('certificates as c')
        .innerJoin('certificate_authorities as ca', 'ca.id', 'c.issuer_id')
        .innerJoin('devices as d', 'd.udid', 'c.device_udid')
        .innerJoin('products as p', 'p.id', 'd.product_id')
        .innerJoin('lines as l', 'l.id', 'd.line_id')
        .select(['c.id', 'c.serial', 'c.not_after', 'ca.name as issuer', 'c.device_udid', 'd.serial_number', 'd.batch_id', 'p.name as product', 'l.name as line'])
        .where('c.status', '=', 'valid').where('c.not_after', '>', nowIso(now)).where('c.not_after', '<=', until).where('c.id', '<=', maxId);
      if (cursor) q = q.where((eb) => eb.or([eb('c.not_after', '>', cursor.notAfter), eb('c.id', '>', cursor.certificateId)]));
      const certs = await q.orderBy('c.not_after').execute();
      // The window is measured from `now`; the deliveries are stamped with the real time (they are due at once).
      const at = nowIso();
      const n = await this.#store.writeTransaction(async (trx) => {
        // Another process scanned meanwhile: its announcements stand, this round's are dropped.
        if ((await readCursor(trx, name)) !== before) return 0;
        const live = await trx.selectFrom('webhooks').select('id').where('id', '=', hook.id).where('disabled_at', 'is', null).executeTakeFirst();
        if (!live) return 0;
        const rows = certs.map((c) => {
          const body: WebhookBody = {
            id: `exp_${c.issuer}_${c.serial}`, event: 'expiring', at,
            data: {
              serial: c.serial, issuer: c.issuer, notAfter: c.not_after, daysLeft: Math.max(0, Math.floor((Date.parse(c.not_after) - now.getTime()) / DAY_MS)), within: this.#withinMs / DAY_MS,
              device: c.device_udid, serialNumber: c.serial_number, product: c.product, line: c.line, batch: c.batch_id,
            },
          };
          return { webhook_id: hook.id, audit_seq: null, event: 'expiring' as WebhookEvent, payload: JSON.stringify(body), status: 'pending' as const, attempts: 0, next_attempt_at: at, last_status: null, last_error: null, created_at: at, delivered_at: null };
        });
        for (let i = 0; i < rows.length; i += 200) await trx.insertInto('webhook_deliveries').values(rows.slice(i, i + 200)).execute();
        const next: ExpiringCursor = { notAfter: cursor && cursor.notAfter > until ? cursor.notAfter : until, certificateId: Math.max(maxId, cursor?.certificateId ?? 0), scannedAt: nowIso(now) };
        await setCursor(trx, name, JSON.stringify(next));
        return rows.length;
      });
      created += n;
    }
    return created;
  }

  /** Sends the deliveries that are due, records each answer. Returns the outcomes. */
  async send(): Promise<{ delivered: number; retrying: number; failed: number }> {
    const totals = { delivered: 0, retrying: 0, failed: 0 };
    for (;;) {
      const now = new Date();
      const due = () => this.#store.db.selectFrom('webhook_deliveries as d').innerJoin('webhooks as w', 'w.id', 'd.webhook_id')
        .where('d.status', '=', 'pending').where('d.next_attempt_at', '<=', nowIso(now)).where('w.disabled_at', 'is', null);
      if (!(await due().select('d.id').limit(1).executeTakeFirst())) return totals;
      // Lease the due deliveries (under the write lock, so two processes never take the same one).
      const claimed = await this.#store.writeTransaction(async (trx) => {
        const rows = await trx.selectFrom('webhook_deliveries as d').innerJoin('webhooks as w', 'w.id', 'd.webhook_id')
          .select(['d.id', 'd.webhook_id', 'd.event', 'd.payload', 'd.attempts', 'w.url', 'w.secret'])
          .where('d.status', '=', 'pending').where('d.next_attempt_at', '<=', nowIso(now)).where('w.disabled_at', 'is', null)
          .orderBy('d.next_attempt_at').orderBy('d.id').limit(50).execute();
        if (rows.length > 0) {
          await trx.updateTable('webhook_deliveries').set({ next_attempt_at: nowIso(new Date(now.getTime() + this.#timeoutMs + LEASE_EXTRA_MS)) })
            .where('id', 'in', rows.map((r) => r.id)).execute();
        }
        return rows.map((r) => ({ ...r, id: Number(r.id), attempts: Number(r.attempts) }));
      });
      if (claimed.length === 0) return totals;
      const outcomes: Outcome[] = [];
      let next = 0;
      const worker = async (): Promise<void> => {
        while (next < claimed.length && !this.#stopped) {
          const d = claimed[next++]!;
          outcomes.push(await this.#attempt(d));
        }
      };
      await Promise.all(Array.from({ length: Math.min(this.#concurrency, claimed.length) }, worker));
      if (this.#stopped) return totals; // abandoned: sent again after the lease
      const r = await this.#record(outcomes);
      totals.delivered += r.delivered; totals.retrying += r.retrying; totals.failed += r.failed;
    }
  }

  async #attempt(d: DueDelivery): Promise<Outcome> {
    const headers = {
      'content-type': 'application/json',
      'user-agent': 'Hallmark-Webhooks/1',
      'hallmark-event': d.event,
      'hallmark-delivery': String(d.id),
      'hallmark-signature': signatureHeader(d.secret, d.payload),
    };
    try {
      const answer = await post(d.url, d.payload, headers, this.#timeoutMs, this.#abort.signal);
      if (answer.status >= 200 && answer.status < 300) return { delivery: d, status: answer.status, error: null };
      const why = answer.status >= 300 && answer.status < 400 ? ' (redirects are not followed)' : '';
      return { delivery: d, status: answer.status, error: `HTTP ${answer.status}${why}${answer.body ? `: ${answer.body}` : ''}`.slice(0, MAX_ERROR_LENGTH) };
    } catch (err) {
      return { delivery: d, status: null, error: describeError(err).slice(0, MAX_ERROR_LENGTH) };
    }
  }

  async #record(outcomes: readonly Outcome[]): Promise<{ delivered: number; retrying: number; failed: number }> {
    const counts = { delivered: 0, retrying: 0, failed: 0 };
    const now = new Date();
    await this.#store.writeTransaction(async (trx) => {
      for (const o of outcomes) {
        const attempts = o.delivery.attempts + 1;
        const base = trx.updateTable('webhook_deliveries').where('id', '=', o.delivery.id).where('status', '=', 'pending');
        if (o.error === null) {
          await base.set({ status: 'delivered', attempts, last_status: o.status, last_error: null, delivered_at: nowIso(now) }).execute();
          counts.delivered += 1;
        } else if (attempts >= this.maxAttempts) {
          await base.set({ status: 'failed', attempts, last_status: o.status, last_error: o.error }).execute();
          counts.failed += 1;
        } else {
          await base.set({ attempts, last_status: o.status, last_error: o.error, next_attempt_at: nowIso(new Date(now.getTime() + this.#backoff[attempts - 1]!)) }).execute();
          counts.retrying += 1;
        }
      }
    });
    for (const o of outcomes) {
      if (o.error === null) continue;
      // Never the secret, the signature or the body: which delivery, where (no query string), what happened.
      const attempts = o.delivery.attempts + 1;
      this.#log?.warn({ delivery: o.delivery.id, webhook: o.delivery.webhook_id, event: o.delivery.event, url: urlForLog(o.delivery.url), status: o.status, error: o.error, attempts, final: attempts >= this.maxAttempts },
        attempts >= this.maxAttempts ? 'webhook delivery failed: no attempts left' : 'webhook delivery failed: will retry');
    }
    return counts;
  }
}

export function startWebhookDispatcher(store: Store, options: WebhookDispatcherOptions = {}): { stop(): Promise<void>; readonly dispatcher?: WebhookDispatcher } {
  if (options.enabled === false) return { stop: async () => {} };
  const dispatcher = new WebhookDispatcher(store, options).start();
  return { dispatcher, stop: () => dispatcher.stop() };
}

function safeJson(text: string): Record<string, unknown> {
  try {
    const v = JSON.parse(text) as unknown;
    return v && typeof v === 'object' ? (v as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}

function describeError(err: unknown): string {
  const e = err as { code?: string; message?: string } | undefined;
  if (e?.code && e.message && !e.message.includes(e.code)) return `${e.code}: ${e.message}`;
  return e?.message ?? String(err);
}

/** One POST, no redirects, no connection reuse; the whole exchange within timeoutMs. Reads at most 1 KiB of the answer. */
function post(url: string, body: string, headers: Record<string, string>, timeoutMs: number, signal: AbortSignal): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = (u.protocol === 'https:' ? httpsRequest : httpRequest)(u, { method: 'POST', headers: { ...headers, 'content-length': String(Buffer.byteLength(body)) }, agent: false, signal }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        if (text.length < 1024) text += chunk;
        else res.destroy();
      });
      const done = (): void => { clearTimeout(timer); resolve({ status: res.statusCode ?? 0, body: text.slice(0, 200).replace(/\s+/g, ' ').trim() }); };
      res.on('end', done);
      res.on('close', done);
      res.on('error', done);
    });
    const timer = setTimeout(() => req.destroy(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    req.on('error', (err) => { clearTimeout(timer); reject(err); });
    req.end(body);
  });
}
