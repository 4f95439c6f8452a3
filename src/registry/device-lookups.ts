// Device point reads on PostgreSQL, coalesced: the lookups that arrive while one query is at the
// server are answered together by the next one (`where udid = any($1)`), a named statement planned
// once per connection.
//
// Why: one query per lookup costs a round trip, a pool checkout and the server's per-statement work
// (~150-250 µs of CPU on both sides). On the project's 2-core machine that caps one-query-per-lookup at
// ~5,000 lookups/s, so 16 concurrent lookups queue for ~3 ms each (Little's law), whatever the pool
// size (more connections only add backends competing for the same two cores). A query for 16 keys
// costs little more than a query for one: measured 16 in flight, ~5,500/s and p99 6-10 ms one query
// per lookup, ~28,000/s and p99 0.8-1 ms coalesced (docs/benchmarks.md, registry lookup).
//
// Consistency is that of a query per lookup: a lookup joins only a query not yet sent, so it sees
// every commit that finished before it was asked. A lone lookup is sent at once (no timer, no wait).
// SQLite does not use this: better-sqlite3 reads synchronously in ~15 µs, there is nothing to share.

import type { Store } from '../store/database.js';
import type { DeviceState } from '../store/schema.js';

/** The columns Registry.device / deviceByPublicKey return (products and lines joined for their names). */
export interface DeviceLookupRow {
  udid: string; serial_number: string | null; state: DeviceState; product: string; line: string; batch_id: string; tenant: string;
  public_key_sha256: string; birth_cert_der: Buffer | null; created_at: string; updated_at: string; provisioned_at: string | null;
}

/** Queries at the server at once. One: on 2 cores a second concurrent query made p99 worse in every run (batches just get larger). */
const QUERIES_IN_FLIGHT = 1;
/** Keys per query at most (a larger backlog is split). */
const MAX_KEYS = 256;

interface Waiter<R> { resolve: (row: R | undefined) => void; reject: (err: unknown) => void }

/** Point reads by a string key, coalesced while a query is out (see the file comment). */
export class CoalescedLookup<R> {
  readonly #run: (keys: string[]) => Promise<R[]>;
  readonly #keyOf: (row: R) => string;
  #pending = new Map<string, Waiter<R>[]>();
  #inFlight = 0;

  /** `run` answers a set of distinct keys with the rows found (any order, absent keys simply missing). */
  constructor(run: (keys: string[]) => Promise<R[]>, keyOf: (row: R) => string) {
    this.#run = run;
    this.#keyOf = keyOf;
  }

  get(key: string): Promise<R | undefined> {
    return new Promise<R | undefined>((resolve, reject) => {
      const waiters = this.#pending.get(key);
      if (waiters) waiters.push({ resolve, reject });
      else this.#pending.set(key, [{ resolve, reject }]);
      this.#pump();
    });
  }

  #pump(): void {
    while (this.#inFlight < QUERIES_IN_FLIGHT && this.#pending.size > 0) {
      let batch: Map<string, Waiter<R>[]>;
      if (this.#pending.size <= MAX_KEYS) {
        batch = this.#pending;
        this.#pending = new Map();
      } else {
        batch = new Map();
        for (const [k, w] of this.#pending) {
          batch.set(k, w);
          this.#pending.delete(k);
          if (batch.size === MAX_KEYS) break;
        }
      }
      this.#inFlight++;
      let settled: Promise<R[]>;
      try { settled = this.#run([...batch.keys()]); } catch (err) { settled = Promise.reject(err); }
      settled.then((rows) => {
        const found = new Map<string, R>();
        for (const row of rows) found.set(this.#keyOf(row), row);
        for (const [k, waiters] of batch) for (const w of waiters) w.resolve(found.get(k));
      }, (err: unknown) => {
        for (const waiters of batch.values()) for (const w of waiters) w.reject(err);
      }).finally(() => {
        // The next query goes once the callers just answered have run on (their awaits are
        // microtasks, nextTick runs after them all), so that the lookups they make next share it
        // rather than the first of them leaving alone.
        process.nextTick(() => {
          this.#inFlight--;
          this.#pump();
        });
      });
    }
  }
}

const DEVICE_SELECT = `select d.udid, d.serial_number, d.state, p.name as product, l.name as line, d.batch_id, d.tenant, d.public_key_sha256,
  d.birth_cert_der, d.created_at, d.updated_at, d.provisioned_at
  from devices d join products p on p.id = d.product_id join lines l on l.id = d.line_id`;

export interface DeviceLookups {
  /** By UDID (normalised lowercase hex). */
  readonly byUdid: CoalescedLookup<DeviceLookupRow>;
  /** By hex SHA-256 of the canonical SPKI DER. */
  readonly byKeyHash: CoalescedLookup<DeviceLookupRow>;
}

const perStore = new WeakMap<Store, DeviceLookups>();

/** The coalesced device lookups of a PostgreSQL store, shared by every Registry on it. */
export function deviceLookups(store: Store): DeviceLookups {
  let lookups = perStore.get(store);
  if (!lookups) {
    lookups = {
      byUdid: new CoalescedLookup((keys) => store.preparedRead<DeviceLookupRow>('hallmark_devices_by_udid', `${DEVICE_SELECT} where d.udid = any($1::text[])`, [keys]), (r) => r.udid),
      byKeyHash: new CoalescedLookup((keys) => store.preparedRead<DeviceLookupRow>('hallmark_devices_by_key', `${DEVICE_SELECT} where d.public_key_sha256 = any($1::text[])`, [keys]), (r) => r.public_key_sha256),
    };
    perStore.set(store, lookups);
  }
  return lookups;
}
