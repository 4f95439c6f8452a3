// Registry lookup latency at 1,000,000 devices: Registry.device(udid) (the joined row an issuance or
// a connection check reads) and Registry.deviceByPublicKey(spki) (what a registered-key enrolment
// asks), each with 16 lookups in flight, and by UDID one at a time. Target from the registry issue: p99 <= 1 ms.
// Ceiling: the same primary-key read straight through the driver (better-sqlite3 prepared
// statement / pg prepared query), so the ratio shows what the registry's layers cost.

import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import BetterSqlite3 from 'better-sqlite3';
import pg from 'pg';
import { Registry } from '../src/registry/registry.js';
import { Store } from '../src/store/database.js';
import { figure, log, type Figure } from './figure.js';

const DEVICES = Number(process.env.HALLMARK_BENCH_DEVICES ?? 1_000_000);
/** Devices with real keys (the lookup targets); the rest carry distinct placeholder keys. */
const REAL = 2000;
const LOOKUPS = Number(process.env.HALLMARK_BENCH_LOOKUPS ?? 20_000);
const IN_FLIGHT = 16;
const PG_ADMIN_URL = process.env.HALLMARK_BENCH_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const STORES = (process.env.HALLMARK_BENCH_STORES ?? 'sqlite,postgresql').split(',').map((x) => x.trim());

const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

interface Target { udid: string; spki: Buffer }

async function populate(store: Store): Promise<Target[]> {
  const now = new Date().toISOString();
  await store.db.insertInto('certificate_authorities').values({ name: 'bench-ca', role: 'intermediate', parent_id: null, status: 'active', subject: 'CN=bench', key_ref: null, key_algorithm: 'ecdsa-p256', ski: '00', path_len: 0, certificate_der: null, csr_der: null, serial: null, not_before: null, not_after: null, created_at: now, updated_at: now }).execute();
  const ca = await store.db.selectFrom('certificate_authorities').select('id').executeTakeFirstOrThrow();
  await store.db.insertInto('tenants').values({ name: 'default', created_at: now }).execute();
  await store.db.insertInto('products').values({ name: 'bench', profile: 'device', validity_days: 365, created_at: now }).execute();
  await store.db.insertInto('lines').values({ name: 'bench', ca_id: ca.id, created_at: now }).execute();
  const product = await store.db.selectFrom('products').select('id').executeTakeFirstOrThrow();
  const line = await store.db.selectFrom('lines').select('id').executeTakeFirstOrThrow();
  await store.db.insertInto('batches').values({ id: 'b-bench', product_id: product.id, line_id: line.id, quota: DEVICES, created_at: now }).execute();
  const targets: Target[] = [];
  for (let i = 0; i < REAL; i++) {
    const spki = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' });
    targets.push({ udid: sha256(spki), spki });
  }
  const started = Date.now();
  const CHUNK = 1000;
  for (let i = 0; i < DEVICES; i += CHUNK * 20) {
    await store.db.transaction().execute(async (trx) => {
      for (let j = i; j < Math.min(i + CHUNK * 20, DEVICES); j += CHUNK) {
        const rows = [];
        for (let k = j; k < Math.min(j + CHUNK, DEVICES); k++) {
          const real = k % Math.floor(DEVICES / REAL) === 0 ? targets[k / Math.floor(DEVICES / REAL)] : undefined;
          const spki = real?.spki ?? Buffer.concat([Buffer.from('placeholder-key-'), randomBytes(16)]);
          const hash = sha256(spki);
          rows.push({ udid: real?.udid ?? hash, public_key_spki: spki, public_key_sha256: hash, serial_number: `SN-${k}`, product_id: product.id, line_id: line.id, batch_id: 'b-bench', tenant: 'default', birth_cert_der: null, state: 'registered' as const, created_at: now, updated_at: now, provisioned_at: null });
        }
        await trx.insertInto('devices').values(rows).execute();
      }
    });
  }
  log(`${store.dialect}: ${DEVICES.toLocaleString('en-US')} devices inserted in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return targets.filter((t) => t !== undefined);
}

/** Runs `op` LOOKUPS times with `inFlight` outstanding; returns latencies in ms, sorted. */
async function latencies(op: (i: number) => Promise<unknown>, inFlight = IN_FLIGHT): Promise<number[]> {
  const out: number[] = [];
  let next = 0;
  const lane = async () => {
    while (next < LOOKUPS) {
      const i = next++;
      const t0 = process.hrtime.bigint();
      await op(i);
      out.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
  };
  await Promise.all(Array.from({ length: inFlight }, lane));
  return out.sort((a, b) => a - b);
}

const p99 = (sorted: number[]): number => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))]!;

async function measure(store: Store, rawLookup: (udid: string) => Promise<unknown>, label: string): Promise<Figure[]> {
  const targets = await populate(store);
  const registry = new Registry(store);
  const pick = (i: number) => targets[(i * 7919) % targets.length]!;
  await latencies((i) => registry.device(pick(i).udid)); // warm-up: caches and JIT
  const byUdid = await latencies(async (i) => { if ((await registry.device(pick(i).udid)).udid !== pick(i).udid) throw new Error('wrong device'); });
  const byKey = await latencies(async (i) => { if ((await registry.deviceByPublicKey(pick(i).spki))?.udid !== pick(i).udid) throw new Error('wrong device'); });
  const raw = await latencies((i) => rawLookup(pick(i).udid));
  // One lookup at a time: the latency of a lone request, with no queueing at all.
  const alone = await latencies((i) => registry.device(pick(i).udid), 1);
  const rawAlone = await latencies((i) => rawLookup(pick(i).udid), 1);
  const note = `${DEVICES.toLocaleString('en-US')} devices, ${LOOKUPS.toLocaleString('en-US')} lookups, ${IN_FLIGHT} in flight; ceiling = p99 of the same read straight through the driver`;
  const ms = (sorted: number[]): string => `p50 ${sorted[sorted.length >> 1]!.toFixed(3)} ms p99 ${p99(sorted).toFixed(3)} ms`;
  log(`${label}: ${IN_FLIGHT} in flight: by UDID ${ms(byUdid)}; by key ${ms(byKey)}; raw ${ms(raw)}. 1 in flight: by UDID ${ms(alone)}; raw ${ms(rawAlone)}`);
  // For latency the ratio is ceiling/value (1.0 = no overhead over the raw driver read).
  return [
    { ...figure(`registry lookup by UDID p99 (${label})`, p99(byUdid), 'ms', p99(raw), note), ratio: p99(raw) / p99(byUdid) },
    { ...figure(`registry lookup by public key p99 (${label})`, p99(byKey), 'ms', p99(raw), note), ratio: p99(raw) / p99(byKey) },
    { ...figure(`registry lookup by UDID p99, 1 in flight (${label})`, p99(alone), 'ms', p99(rawAlone), note.replace(`${IN_FLIGHT} in flight`, '1 in flight')), ratio: p99(rawAlone) / p99(alone) },
  ];
}

export async function run(): Promise<Figure[]> {
  const figures: Figure[] = [];
  if (STORES.includes('sqlite')) {
    const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-registry-'));
    const file = join(dir, 'registry.db');
    const store = await Store.open({ url: file });
    const raw = new BetterSqlite3(file, { readonly: true });
    const stmt = raw.prepare('select * from devices where udid = ?');
    try {
      figures.push(...await measure(store, async (udid) => stmt.get(udid), 'sqlite'));
    } finally {
      raw.close();
      await store.close();
      await rm(dir, { recursive: true, force: true });
    }
  }
  if (STORES.includes('postgresql')) {
    const name = `hallmark_bench_${randomBytes(4).toString('hex')}`;
    const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
    admin.on('error', () => {});
    await admin.connect();
    await admin.query(`create database ${name}`);
    const url = PG_ADMIN_URL.replace(/\/[^/]*$/, `/${name}`);
    const store = await Store.open({ url });
    const pool = new pg.Pool({ connectionString: url, max: 8 });
    pool.on('error', () => { /* the database is dropped at the end */ });
    try {
      figures.push(...await measure(store, (udid) => pool.query({ name: 'raw-device', text: 'select * from devices where udid = $1', values: [udid] }), 'postgresql'));
    } finally {
      await pool.end();
      await store.close();
      await admin.query(`drop database ${name} with (force)`);
      await admin.end();
    }
  }
  return figures;
}
