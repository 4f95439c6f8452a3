// CRL generation at scale: a full CRL of 1,000,000 revoked certificates, built and signed through the
// real code path, and a delta CRL after 1,000 new revocations.
//
//   encoder    encodeCrl (src/protocols/crl/crl.ts) with the issuing CA's signer, entries already in memory
//              (read from the store before the clock starts): the encoder alone.
//   publisher  CrlPublisher (src/authority/crl-publisher.ts) making the first full CRL of a CA whose store
//              holds the 1M revoked rows: the SQL read, the encoding, the signature, the `crls` row (the
//              DER is stored) and its audit entry, and the (empty) delta that follows every new full CRL.
//              Then 1,000 more certificates are revoked through Authority.revoke and the delta is timed.
//
// Each measurement runs in a child process (this same file, forked with --crl-child) so that its peak
// memory is its own: getrusage maxRSS (= /proc/self/status VmHWM) of the whole process, the Node runtime
// and the opened authority included, which is how `openssl ca -gencrl`'s peak is counted too.
//
// Ceilings, measured in the same run:
//   time    the crypto floor of the same output: SHA-256 over the very TBSCertList that was signed, one
//           ECDSA P-256 signature over it, and one copy of the bytes (any encoder must at least write,
//           hash and sign them). Lower is better for times and sizes: ratio = value / ceiling, 1.00 is the floor.
//   memory  the child's RSS before generation began (runtime + authority, and for the encoder the entries
//           already in memory) plus the CRL's size once: what holding the result costs at the least.
//   size    the size of OpenSSL's own DER re-encoding of the CRL (`openssl crl -inform DER -outform DER`):
//           ratio 1.00 and equal bytes mean the CRL is exactly what OpenSSL would write. That OpenSSL pass
//           is also timed (and its peak RSS taken with /usr/bin/time when present) as a reference.
//
// Env (defaults in brackets): HALLMARK_BENCH_CRL_ENTRIES revoked rows [1000000], HALLMARK_BENCH_CRL_DELTA
// revocations after the full CRL [1000], HALLMARK_BENCH_CRL_RUNS [encoder,publisher],
// HALLMARK_BENCH_CRL_CPU_PROF=DIR (children under --cpu-prof into DIR).

import { execFileSync, fork, spawnSync } from 'node:child_process';
import { createHash, randomBytes, sign as cryptoSign } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import BetterSqlite3 from 'better-sqlite3';
import { Authority } from '../src/authority/authority.js';
import { CrlPublisher } from '../src/authority/crl-publisher.js';
import { initAuthority } from '../src/authority/init.js';
import { databaseUrl } from '../src/authority/home.js';
import { encodePem } from '../src/pki/pem.js';
import { encodeCrl, parseCrl, type CrlEntry } from '../src/protocols/crl/crl.js';
import { figure, log, type Figure } from './figure.js';

const envInt = (name: string, fallback: number): number => {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a whole number ≥ 0 (got ${JSON.stringify(v)})`);
  return n;
};

const ENTRIES = envInt('HALLMARK_BENCH_CRL_ENTRIES', 1_000_000);
const DELTA = envInt('HALLMARK_BENCH_CRL_DELTA', 1_000);
const RUNS = (process.env.HALLMARK_BENCH_CRL_RUNS ?? 'encoder,publisher').split(',').map((x) => x.trim());
const CPU_PROF_DIR = process.env.HALLMARK_BENCH_CRL_CPU_PROF;
const PASSPHRASE = 'bench-passphrase';
const CA = 'issuing-1';

/** Targets from the revocation issue (for scale: `openssl ca -gencrl` takes 4.8 s and 395 MB for 1M entries on this machine). */
const TARGET_SECONDS = 5;
const TARGET_PEAK_MB = 400;

const MB = 1024 * 1024;
const fmt = (n: number): string => Math.round(n).toLocaleString('en-US');
const here = fileURLToPath(import.meta.url);

// ------------------------------------------------------------------ memory (Linux)

/** Peak resident set of this process so far, bytes (getrusage maxRSS, the same as VmHWM). */
const peakRss = (): number => process.resourceUsage().maxRSS * 1024;

// ------------------------------------------------------------------ filling the store

/**
 * `revoked` revoked certificate rows and `valid` valid ones of CA issuing-1, straight into the SQLite file
 * (one transaction, prepared statement): 1M rows through Authority.issue would take far longer than the
 * CRL. Serials are 16 random bytes with the top bit clear, as newSerial() makes them; revocation times
 * are spread over the past year (all distinct, at least two hours old: older than any delta's window);
 * reasons: half unspecified (no reasonCode), then keyCompromise, superseded, cessationOfOperation.
 * The der column holds a 1-byte placeholder (the CRL never reads it).
 */
function fillStore(home: string, revoked: number, valid: number): { seconds: number } {
  const t0 = process.hrtime.bigint();
  const db = new BetterSqlite3(databaseUrl(home));
  try {
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = OFF');
    db.pragma('cache_size = -262144');
    const ca = db.prepare('select id from certificate_authorities where name = ?').get(CA) as { id: number } | undefined;
    if (!ca) throw new Error(`no CA ${CA} in the new home`);
    const insert = db.prepare(`insert into certificates (issuer_id, serial, profile, subject, fingerprint_sha256, not_before, not_after, der, status, revoked_at, revocation_reason, requested_by, created_at)
      values (?, ?, 'device', 'CN=bench', ?, ?, ?, x'00', ?, ?, ?, 'bench', ?)`);
    const now = Date.now();
    const notBefore = new Date(now - 400 * 86_400_000).toISOString();
    const notAfter = new Date(now + 365 * 86_400_000).toISOString();
    const reasons = ['unspecified', 'unspecified', 'unspecified', 'unspecified', 'keyCompromise', 'keyCompromise', 'keyCompromise', 'superseded', 'superseded', 'cessationOfOperation'];
    const yearMs = 365 * 86_400_000;
    const total = revoked + valid;
    let pool = Buffer.alloc(0);
    let at = 0;
    const serialHex = (): string => {
      if (at + 16 > pool.length) { pool = randomBytes(64 * 1024); at = 0; }
      const b = pool.subarray(at, at + 16);
      at += 16;
      b[0]! &= 0x7f;
      let z = 0;
      while (z < 15 && b[z] === 0) z++;
      return b.toString('hex', z);
    };
    db.transaction(() => {
      for (let i = 0; i < total; i++) {
        const serial = serialHex();
        const fingerprint = createHash('sha256').update(serial).digest('hex');
        if (i < revoked) {
          // Distinct, increasing with the row id (older revocations were inserted first), ms precision as nowIso().
          const when = new Date(now - 2 * 3_600_000 - yearMs + Math.floor((i / revoked) * yearMs)).toISOString();
          insert.run(ca.id, serial, fingerprint, notBefore, notAfter, 'revoked', when, reasons[i % reasons.length], notBefore);
        } else {
          insert.run(ca.id, serial, fingerprint, notBefore, notAfter, 'valid', null, null, notBefore);
        }
      }
    })();
    db.pragma('wal_checkpoint(TRUNCATE)');
    db.exec('analyze');
  } finally {
    db.close();
  }
  return { seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
}

function readValid(home: string, n: number): string[] {
  const db = new BetterSqlite3(databaseUrl(home), { readonly: true });
  try {
    return (db.prepare("select serial from certificates where status = 'valid' and profile = 'device' order by id desc limit ?").all(n) as { serial: string }[]).map((r) => r.serial);
  } finally {
    db.close();
  }
}

// ------------------------------------------------------------------ the children

interface ChildResult {
  readonly mode: string;
  readonly entries: number;
  readonly seconds: number;
  readonly bytes: number;
  readonly baselineRss: number;
  readonly peakRss: number;
  readonly floorSeconds: number;
  readonly crlFile: string;
  readonly notes: string[];
  readonly delta?: { seconds: number; entries: number; bytes: number; floorSeconds: number; revokeSeconds: number; deltaFile: string };
}

/** The crypto floor of producing `tbs` signed: SHA-256 of it, one ECDSA signature, one copy. Best of 3. */
function cryptoFloorSeconds(tbs: Buffer, key: Parameters<typeof cryptoSign>[2]): number {
  let best = Infinity;
  for (let k = 0; k < 3; k++) {
    const t0 = process.hrtime.bigint();
    const copy = Buffer.allocUnsafe(tbs.length);
    tbs.copy(copy);
    createHash('sha256').update(copy).digest();
    cryptoSign('sha256', copy.subarray(0, 64), key); // the signature over a digest costs the same whatever the message
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
  }
  return best;
}

async function childMain(mode: string, home: string, outDir: string, deltaCount: number): Promise<ChildResult> {
  const authority = await Authority.open(home, PASSPHRASE);
  try {
    const ca = await authority.signingCa(CA);
    // A P-256 key for the floor (the CA key is not extractable through the backend API; same curve, same cost).
    const { generateKeyPairSync } = await import('node:crypto');
    const floorKey = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
    const notes: string[] = [];
    if (mode === 'encoder') {
      const rows = authority.store.db.selectFrom('certificates').select(['serial', 'revoked_at', 'revocation_reason'])
        .where('issuer_id', '=', ca.row.id).where('status', '=', 'revoked').orderBy('id');
      const entries: CrlEntry[] = (await rows.execute()).map((r) => ({ serialHex: r.serial, revokedAt: new Date(r.revoked_at!), reason: r.revocation_reason }));
      global.gc?.();
      const baselineRss = process.memoryUsage.rss();
      const thisUpdate = new Date(Math.floor(Date.now() / 1000) * 1000);
      let signedTbs: Buffer | undefined;
      const t0 = process.hrtime.bigint();
      const der = await encodeCrl({
        issuer: ca.subject, issuerKeyId: ca.keyId, scheme: ca.scheme, thisUpdate, nextUpdate: new Date(thisUpdate.getTime() + 7 * 86_400_000), number: 1, entries,
      }, (tbs) => { signedTbs = tbs; return ca.signer.sign(tbs); });
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const peak = peakRss();
      const floorSeconds = cryptoFloorSeconds(signedTbs!, floorKey);
      const crlFile = join(outDir, 'encoder.crl');
      writeFileSync(crlFile, der);
      return { mode, entries: entries.length, seconds, bytes: der.length, baselineRss, peakRss: peak, floorSeconds, crlFile, notes };
    }
    // publisher
    // The authority itself, except that the CA's signer notes when its first signature starts and ends:
    // the phases of the full CRL (read + encode, sign, store + the empty delta) without touching src/.
    const marks: bigint[] = [];
    const source = {
      store: authority.store, directory: authority.directory, events: authority.events, config: authority.config,
      signingCa: async (name: string) => {
        const real = await authority.signingCa(name);
        return { ...real, signer: { ...real.signer, sign: async (tbs: Buffer) => { marks.push(process.hrtime.bigint()); const sig = await real.signer.sign(tbs); marks.push(process.hrtime.bigint()); return sig; } } };
      },
    };
    const publisher = new CrlPublisher(source, { checkEveryMs: 0, debounceMs: 3_600_000, actor: 'bench' });
    try {
      global.gc?.();
      const baselineRss = process.memoryUsage.rss();
      const t0 = process.hrtime.bigint();
      const full = await publisher.current(CA, 'full');
      const t1 = process.hrtime.bigint();
      const seconds = Number(t1 - t0) / 1e9;
      const ms = (a: bigint, b: bigint): string => `${(Number(b - a) / 1e6).toFixed(0)} ms`;
      notes.push(`phases: read rows + encode ${ms(t0, marks[0]!)}, sign (SHA-256 of the TBS + ECDSA, thread pool) ${ms(marks[0]!, marks[1]!)}, ` +
        `store the CRL + audit entry, then the empty delta ${ms(marks[1]!, t1)}`);
      const peak = peakRss();
      const tbs = parseCrl(full.der).tbs;
      const floorSeconds = cryptoFloorSeconds(tbs, floorKey);
      const crlFile = join(outDir, 'publisher.crl');
      writeFileSync(crlFile, full.der);

      // The delta after `deltaCount` revocations through the real path (each its own transaction and audit entry).
      const serials = readValid(home, deltaCount);
      const r0 = process.hrtime.bigint();
      for (const serial of serials) await authority.revoke({ serial, ca: CA }, 'keyCompromise', 'bench');
      const revokeSeconds = Number(process.hrtime.bigint() - r0) / 1e9;
      const d0 = process.hrtime.bigint();
      const delta = await publisher.current(CA, 'delta');
      const deltaSeconds = Number(process.hrtime.bigint() - d0) / 1e9;
      const deltaParsed = parseCrl(delta.der);
      if (deltaParsed.deltaBase !== full.number) throw new Error(`the delta builds on CRL ${deltaParsed.deltaBase}, not on the full CRL ${full.number}`);
      const deltaFile = join(outDir, 'delta.crl');
      writeFileSync(deltaFile, delta.der);
      return {
        mode, entries: full.entries, seconds, bytes: full.der.length, baselineRss, peakRss: peak, floorSeconds, crlFile, notes,
        delta: { seconds: deltaSeconds, entries: delta.entries, bytes: delta.der.length, floorSeconds: cryptoFloorSeconds(deltaParsed.tbs, floorKey), revokeSeconds, deltaFile },
      };
    } finally {
      await publisher.stop();
    }
  } finally {
    await authority.close();
  }
}

function runChild(mode: string, home: string, outDir: string): Promise<ChildResult> {
  const execArgv = ['--expose-gc', ...(CPU_PROF_DIR ? ['--cpu-prof', `--cpu-prof-dir=${CPU_PROF_DIR}`] : [])];
  const child = fork(here, ['--crl-child', mode, home, outDir, String(DELTA)], { execArgv, stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env: { ...process.env } });
  return new Promise<ChildResult>((resolveP, reject) => {
    let result: ChildResult | undefined;
    let failure: string | undefined;
    child.on('message', (m: { type: string; result?: ChildResult; error?: string }) => {
      if (m.type === 'result') result = m.result;
      else if (m.type === 'error') failure = m.error;
    });
    child.on('exit', (code, signal) => {
      if (result) resolveP(result);
      else reject(new Error(`the ${mode} child ${signal ? `was killed by ${signal}` : `exited with code ${code}`}${failure ? `: ${failure}` : ''}`));
    });
  });
}

// ------------------------------------------------------------------ OpenSSL reference

interface OpensslPass { readonly seconds: number; readonly peakRss: number | null; readonly der: Buffer }

/** `openssl crl -inform DER -outform DER`: OpenSSL decodes every entry and writes the CRL back. Best of 2. */
function opensslReencode(file: string, outDir: string): OpensslPass {
  const out = join(outDir, 'openssl-reencoded.crl');
  const haveTime = existsSync('/usr/bin/time');
  let best: OpensslPass | undefined;
  for (let k = 0; k < 2; k++) {
    const args = ['crl', '-inform', 'DER', '-in', file, '-outform', 'DER', '-out', out];
    const t0 = process.hrtime.bigint();
    const r = haveTime ? spawnSync('/usr/bin/time', ['-f', 'MAXRSS %M', 'openssl', ...args], { encoding: 'utf8' }) : spawnSync('openssl', args, { encoding: 'utf8' });
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    if (r.status !== 0) throw new Error(`openssl crl failed: ${r.stderr}`);
    const m = /MAXRSS (\d+)/.exec(r.stderr ?? '');
    const pass = { seconds, peakRss: m ? Number(m[1]) * 1024 : null, der: readFileSync(out) };
    if (!best || pass.seconds < best.seconds) best = pass;
  }
  return best!;
}

/** OpenSSL checks the CRL's signature against the CA certificate ("verify OK") and counts its entries. */
function opensslCheck(file: string, caPem: string): number {
  const r = spawnSync('openssl', ['crl', '-inform', 'DER', '-in', file, '-noout', '-CAfile', caPem], { encoding: 'utf8' });
  if (r.status !== 0 || !/verify OK/.test(r.stderr + r.stdout)) throw new Error(`openssl does not verify ${file}: ${r.stderr}${r.stdout}`);
  const text = execFileSync('openssl', ['crl', '-inform', 'DER', '-in', file, '-noout', '-text'], { maxBuffer: 1024 * MB, encoding: 'utf8' });
  return text.split('Serial Number:').length - 1;
}

// ------------------------------------------------------------------ run

export async function run(): Promise<Figure[]> {
  const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-crl-'));
  try {
    const home = join(dir, 'home');
    await initAuthority({ home, rootDir: join(dir, 'root'), org: 'Hallmark Bench', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'bench' });
    const authority = await Authority.open(home, PASSPHRASE);
    let caPem: string;
    try {
      const chain = await authority.caChain(CA);
      caPem = join(dir, 'chain.pem');
      writeFileSync(caPem, chain.map((d) => encodePem('CERTIFICATE', d)).join(''));
    } finally {
      await authority.close();
    }
    log(`filling the store with ${fmt(ENTRIES)} revoked and ${fmt(DELTA)} valid certificate rows of ${CA}…`);
    const fill = fillStore(home, ENTRIES, DELTA);
    log(`filled in ${fill.seconds.toFixed(1)} s`);

    const out: Figure[] = [];
    const met = (ok: boolean): string => (ok ? 'met' : 'MISSED');
    const n = `${Math.round(ENTRIES / 1000).toLocaleString('en-US')}k`;
    for (const mode of ['encoder', 'publisher']) {
      if (!RUNS.includes(mode)) continue;
      log(`${mode}: generating the full CRL in a child process…`);
      const r = await runChild(mode, home, dir);
      if (r.entries !== ENTRIES) throw new Error(`${mode}: ${r.entries} entries on the CRL, expected ${ENTRIES}`);
      const counted = opensslCheck(r.crlFile, caPem);
      if (counted !== ENTRIES) throw new Error(`${mode}: openssl counts ${counted} entries, expected ${ENTRIES}`);
      const ossl = opensslReencode(r.crlFile, dir);
      const same = ossl.der.equals(readFileSync(r.crlFile));
      const what = mode === 'encoder' ? 'encodeCrl + CA signature, entries in memory' : 'CrlPublisher, SQLite: read, encode, sign, store + audit, empty delta';
      for (const note of r.notes) log(`${mode}: ${note}`);
      log(`${mode}: ${fmt(r.entries)} entries, ${r.seconds.toFixed(2)} s, ${(r.bytes / MB).toFixed(1)} MiB, peak RSS ${(r.peakRss / MB).toFixed(0)} MiB (before generation ${(r.baselineRss / MB).toFixed(0)} MiB); ` +
        `openssl verifies it and counts ${fmt(counted)} entries; openssl re-encode ${ossl.seconds.toFixed(2)} s${ossl.peakRss ? `, ${(ossl.peakRss / MB).toFixed(0)} MiB peak` : ''}, ${same ? 'byte-identical' : 'DIFFERENT bytes'}`);
      out.push(figure(`CRL ${n} entries, ${mode}: time`, r.seconds, 's', r.floorSeconds,
        `${what}; target ≤ ${TARGET_SECONDS} s ${met(r.seconds <= TARGET_SECONDS)}; ceiling = SHA-256 of the TBS + one P-256 signature + one copy (the floor of the same output); ` +
        `openssl crl decode + re-encode of the same CRL ${ossl.seconds.toFixed(2)} s`));
      out.push(figure(`CRL ${n} entries, ${mode}: peak RSS`, r.peakRss / MB, 'MiB', (r.baselineRss + r.bytes) / MB,
        `whole child process (getrusage maxRSS); target ≤ ${TARGET_PEAK_MB} MB ${met(r.peakRss <= TARGET_PEAK_MB * 1e6)}; ceiling = RSS before generation (${(r.baselineRss / MB).toFixed(0)} MiB) + the CRL once` +
        (ossl.peakRss ? `; openssl crl re-encode peaks at ${(ossl.peakRss / MB).toFixed(0)} MiB` : '')));
      if (mode === 'encoder' || !RUNS.includes('encoder')) {
        out.push(figure(`CRL ${n} entries: size`, r.bytes / MB, 'MiB', ossl.der.length / MB, `DER, ${(r.bytes / r.entries).toFixed(1)} bytes per entry; ceiling = OpenSSL's re-encoding (${same ? 'byte-identical' : 'different bytes'})`));
      }
      if (r.delta) {
        const d = r.delta;
        if (d.entries !== DELTA) throw new Error(`delta: ${d.entries} entries, expected ${DELTA}`);
        const dCount = opensslCheck(d.deltaFile, caPem);
        if (dCount !== DELTA) throw new Error(`delta: openssl counts ${dCount} entries, expected ${DELTA}`);
        log(`delta: ${fmt(DELTA)} revocations through Authority.revoke in ${d.revokeSeconds.toFixed(2)} s (untimed), then the delta CRL in ${(d.seconds * 1000).toFixed(1)} ms, ${fmt(d.bytes)} bytes; openssl verifies it`);
        out.push(figure(`delta CRL after ${fmt(DELTA)} revocations (base ${n}): time`, d.seconds * 1000, 'ms', d.floorSeconds * 1000,
          `CrlPublisher: delta query, encode, sign, store + audit; ${fmt(d.bytes)} bytes; ceiling = SHA-256 of its TBS + one P-256 signature`));
      }
    }
    return out;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------ child entry point

if (process.argv[2] === '--crl-child' && process.argv[1] && resolve(process.argv[1]) === here) {
  const [, , , mode, home, outDir, deltaCount] = process.argv;
  try {
    const result = await childMain(mode!, home!, outDir!, Number(deltaCount));
    await new Promise<void>((r) => process.send!({ type: 'result', result }, undefined, {}, () => r()));
    process.exit(0);
  } catch (err) {
    await new Promise<void>((r) => process.send!({ type: 'error', error: (err as Error).stack ?? String(err) }, undefined, {}, () => r()));
    process.exit(1);
  }
}
