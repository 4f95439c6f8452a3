// Manifest import throughput: importManifest() of a generated Microchip-format manifest (a JSON array
// of JWS entries, each signed ES256 by the manifest signer) into a fresh store, every signature
// verified, on SQLite and PostgreSQL. Target from the registry issue: >= 10,000 entries/s on SQLite.
// Ceiling: what one thread of Node's crypto.verify does for the same check (ES256, ieee-p1363
// signature, ready public KeyObject, the manifest's own first entries), measured in the same process
// just before the import, so the ratio says how many "verify threads' worth" the whole import (read,
// parse, verify, check, store, audit) manages.
//
// The manifest (default 1,000,000 entries, env HALLMARK_BENCH_MANIFEST_ENTRIES) is written to a temp
// file before any timing, by two worker threads: device keys are P-256 points made by point addition
// (Q + k·G over a few hundred random Q, one batched inversion per step) and their negations (x, p − y),
// so a million distinct valid keys cost a few seconds instead of ~40 s of key generation; signing the
// entries (~30 µs each) is most of the generation time.
//
// Each import runs in a fresh child process (this file, forked), so that its peak RSS is its own and
// not what generation or the other store left behind. The peak is the kernel's (getrusage maxRSS):
// sampling process.memoryUsage().rss on a timer misses the SQLite store phase, whose statements run
// synchronously and keep timers from firing. After the import the child checks that the batch holds
// exactly N devices.

import { createECDH, createHash, createPrivateKey, createPublicKey, randomBytes, sign as cryptoSign, verify as cryptoVerify, type ECDH, type KeyObject } from 'node:crypto';
import { mkdtemp, open, rm, stat } from 'node:fs/promises';
import { fork } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import pg from 'pg';
import { SCHEMES } from '../src/pki/algorithms.js';
import { assembleCertificate, encodeTbsCertificate } from '../src/pki/certificate.js';
import { authorityKeyIdentifier, basicConstraints, keyIdentifier, keyUsage, subjectKeyIdentifier } from '../src/pki/extensions.js';
import { encodeNameString } from '../src/pki/names.js';
import { encodePem } from '../src/pki/pem.js';
import { importManifest } from '../src/registry/manifests/import.js';
import { loadSigners } from '../src/registry/manifests/signers.js';
import { Registry } from '../src/registry/registry.js';
import { Store, nowIso } from '../src/store/database.js';
import { figure, log, type Figure } from './figure.js';

const ENTRIES = Number(process.env.HALLMARK_BENCH_MANIFEST_ENTRIES ?? 1_000_000);
const PG_ADMIN_URL = process.env.HALLMARK_BENCH_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const STORES = (process.env.HALLMARK_BENCH_STORES ?? 'sqlite,postgresql').split(',').map((x) => x.trim());
/** Entries per generated chunk (one worker message). */
const CHUNK = 5000;
const GEN_WORKERS = 2;
const WORKER_KIND = 'hallmark-bench-manifest-generator';

// ------------------------------------------------------------------ P-256 points by addition

const P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffffn;
const GX = 0x6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296n;
const GY = 0x4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5n;
const mod = (a: bigint): bigint => { const r = a % P; return r < 0n ? r + P : r; };

function modInverse(a: bigint): bigint {
  let t = 0n; let newT = 1n; let r = P; let newR = mod(a);
  while (newR !== 0n) {
    const q = r / newR;
    [t, newT] = [newT, t - q * newT];
    [r, newR] = [newR, r - q * newR];
  }
  if (r !== 1n) throw new Error('not invertible');
  return mod(t);
}

/**
 * A random P-256 key pair as an ECDH object. Not generateKeyPairSync: Node 20 can deadlock when a key's
 * details are read while the garbage collector finalises the KeyGenJob that made it (see
 * bench/issuance.bench.ts); ECDH keys involve no such job.
 */
function randomEcdh(): ECDH {
  const ecdh = createECDH('prime256v1');
  ecdh.generateKeys();
  return ecdh;
}

/** A random P-256 point, uncompressed (04 || X || Y). */
const randomPoint = (): Buffer => randomEcdh().getPublicKey();

const b64 = (v: bigint): string => Buffer.from(v.toString(16).padStart(64, '0'), 'hex').toString('base64url');

/**
 * Distinct P-256 public keys as JWK (x, y) base64url: `lanes` random points Q_j, then Q_j + k·G for
 * k = 1, 2, … (the x-differences of all lanes inverted together), each point also given negated (x, p − y).
 */
function* p256Points(lanes: number): Generator<[string, string]> {
  const xs: bigint[] = [];
  const ys: bigint[] = [];
  for (let j = 0; j < lanes; j++) {
    const point = randomPoint();
    xs.push(BigInt(`0x${point.subarray(1, 33).toString('hex')}`));
    ys.push(BigInt(`0x${point.subarray(33, 65).toString('hex')}`));
  }
  const prefix: bigint[] = new Array<bigint>(lanes);
  const d: bigint[] = new Array<bigint>(lanes);
  for (;;) {
    for (let j = 0; j < lanes; j++) {
      const bx = b64(xs[j]!);
      yield [bx, b64(ys[j]!)];
      yield [bx, b64(P - ys[j]!)];
    }
    // Q_j += G for every lane: λ = (y − Gy) / (x − Gx), with one inversion for all lanes.
    for (let j = 0; j < lanes; j++) {
      d[j] = mod(xs[j]! - GX);
      prefix[j] = j === 0 ? d[j]! : (prefix[j - 1]! * d[j]!) % P;
    }
    let inv = modInverse(prefix[lanes - 1]!);
    for (let j = lanes - 1; j >= 0; j--) {
      const invJ = j === 0 ? inv : (inv * prefix[j - 1]!) % P;
      inv = (inv * d[j]!) % P;
      const lambda = mod((ys[j]! - GY) * invJ);
      const x3 = mod(lambda * lambda - xs[j]! - GX);
      const y3 = mod(lambda * (xs[j]! - x3) - ys[j]!);
      xs[j] = x3;
      ys[j] = y3;
    }
  }
}

// ------------------------------------------------------------------ manifest generation

interface GeneratorData { kind: typeof WORKER_KIND; worker: number; workers: number; entries: number; signerPkcs8: Uint8Array; protectedB64: string }

/** uniqueId of entry i: "0123" (Microchip's prefix) and 7 bytes, a bijection of i that looks random. */
function uniqueIdOf(i: number): string {
  const v = (BigInt(i) * 0x9e3779b97f4a7cn + 0x5bd1e995n) & 0xffffffffffffffn;
  return `0123${v.toString(16).padStart(14, '0')}`;
}

function generatorWorker(data: GeneratorData): void {
  const key = createPrivateKey({ key: Buffer.from(data.signerPkcs8), format: 'der', type: 'pkcs8' });
  const points = p256Points(256);
  const stamp = '2024-03-06T12:00:00.000Z';
  for (let chunk = data.worker; chunk * CHUNK < data.entries; chunk += data.workers) {
    const parts: string[] = [];
    for (let i = chunk * CHUNK; i < Math.min((chunk + 1) * CHUNK, data.entries); i++) {
      const [x, y] = points.next().value as [string, string];
      const uniqueId = uniqueIdOf(i);
      const payload = {
        version: 1, model: 'ATECC608B', partNumber: 'ATECC608B-TNGTLSU-G',
        manufacturer: { organizationName: 'Microchip Technology Inc', organizationalUnitName: 'Secure Products Group' },
        provisioningTimestamp: stamp, uniqueId,
        publicKeySet: { keys: [{ kid: '0', kty: 'EC', crv: 'P-256', x, y }] },
      };
      const body = Buffer.from(JSON.stringify(payload)).toString('base64url');
      const signature = cryptoSign('sha256', Buffer.from(`${data.protectedB64}.${body}`), { key, dsaEncoding: 'ieee-p1363' }).toString('base64url');
      parts.push(JSON.stringify({ payload: body, protected: data.protectedB64, header: { uniqueId }, signature }));
    }
    parentPort!.postMessage({ chunk, text: parts.join(',\n') });
  }
  parentPort!.postMessage({ done: true });
}

if (!isMainThread && (workerData as GeneratorData | undefined)?.kind === WORKER_KIND) generatorWorker(workerData as GeneratorData);

export interface Generated { file: string; signerPem: string; bytes: number }

export async function generateManifest(dir: string, entries: number): Promise<Generated> {
  const started = Date.now();
  // The manifest signer: a P-256 key with a self-signed certificate (given as the trusted signer).
  const ecdh = randomEcdh();
  const point = ecdh.getPublicKey();
  const hexToB64url = (hex: string): string => Buffer.from(hex, 'hex').toString('base64url');
  const privateKey = createPrivateKey({
    key: { kty: 'EC', crv: 'P-256', x: point.subarray(1, 33).toString('base64url'), y: point.subarray(33, 65).toString('base64url'), d: hexToB64url(ecdh.getPrivateKey().toString('hex').padStart(64, '0')) },
    format: 'jwk',
  });
  const spki = createPublicKey(privateKey).export({ type: 'spki', format: 'der' });
  const subject = 'CN=Bench Manifest Signer,O=Hallmark Bench';
  const tbs = encodeTbsCertificate({
    serial: randomBytes(16), scheme: SCHEMES.ecdsaSha256, issuer: encodeNameString(subject),
    notBefore: new Date(Date.now() - 86_400_000), notAfter: new Date(Date.now() + 3650 * 86_400_000),
    subject: encodeNameString(subject), subjectPublicKeyInfo: spki,
    extensions: [basicConstraints(false), keyUsage(['digitalSignature']), subjectKeyIdentifier(keyIdentifier(spki)), authorityKeyIdentifier(keyIdentifier(spki))],
  });
  const certDer = assembleCertificate(tbs, SCHEMES.ecdsaSha256, cryptoSign('sha256', tbs, privateKey));
  const signerPem = encodePem('CERTIFICATE', certDer);
  const header = { typ: 'JWT', alg: 'ES256', kid: keyIdentifier(spki).toString('base64url'), 'x5t#S256': createHash('sha256').update(certDer).digest('base64url') };
  const protectedB64 = Buffer.from(JSON.stringify(header)).toString('base64url');

  const file = join(dir, 'manifest.json');
  const fh = await open(file, 'w');
  try {
    await fh.write('[\n');
    const pending = new Map<number, string>();
    let next = 0;
    let written = Promise.resolve();
    const chunks = Math.ceil(entries / CHUNK);
    await new Promise<void>((resolve, reject) => {
      let running = GEN_WORKERS;
      const workers = Array.from({ length: GEN_WORKERS }, (_, worker) => new Worker(new URL(import.meta.url), {
        workerData: { kind: WORKER_KIND, worker, workers: GEN_WORKERS, entries, signerPkcs8: privateKey.export({ type: 'pkcs8', format: 'der' }), protectedB64 } satisfies GeneratorData,
      }));
      for (const w of workers) {
        w.on('error', (err) => { for (const o of workers) void o.terminate(); reject(err); });
        w.on('message', (m: { chunk: number; text: string } | { done: true }) => {
          if ('done' in m) { if (--running === 0) resolve(); return; }
          pending.set(m.chunk, m.text);
          while (pending.has(next)) {
            const text = (next === 0 ? '' : ',\n') + pending.get(next)!;
            pending.delete(next);
            next++;
            written = written.then(() => fh.write(text).then(() => undefined));
            written.catch(() => { /* reported by the await below */ });
            if (next % 40 === 0) log(`manifest: ${Math.min(next * CHUNK, entries).toLocaleString('en-US')} entries generated`);
          }
        });
      }
    });
    await written;
    if (next !== chunks) throw new Error(`generated ${next} of ${chunks} chunks`);
    await fh.write('\n]\n');
  } finally {
    await fh.close();
  }
  const bytes = (await stat(file)).size;
  log(`manifest: ${entries.toLocaleString('en-US')} entries, ${(bytes / 1e6).toFixed(0)} MB, generated in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return { file, signerPem, bytes };
}

// ------------------------------------------------------------------ ceiling

/** Signing inputs and signatures of the manifest's first entries (the file is written as "[\n" entries joined by ",\n"). */
async function sampleEntries(file: string, count: number): Promise<{ input: Buffer; signature: Buffer }[]> {
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.alloc(2 * 1024 * 1024);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    const parts = buf.toString('utf8', 2, bytesRead).split(',\n').slice(0, -1).slice(0, count);
    return parts.map((text) => {
      const e = JSON.parse(text) as { protected: string; payload: string; signature: string };
      return { input: Buffer.from(`${e.protected}.${e.payload}`, 'ascii'), signature: Buffer.from(e.signature, 'base64url') };
    });
  } finally {
    await fh.close();
  }
}

/** One-thread crypto.verify rate for a manifest entry's check: ES256, ieee-p1363, ready KeyObject, the manifest's own entries. */
export async function verifyCeiling(file: string, key: KeyObject, seconds = 1.5): Promise<number> {
  const samples = await sampleEntries(file, 256);
  const check = (i: number): void => {
    const s = samples[i % samples.length]!;
    if (!cryptoVerify('sha256', s.input, { key, dsaEncoding: 'ieee-p1363' }, s.signature)) throw new Error('a sample entry does not verify');
  };
  for (let i = 0; i < 500; i++) check(i);
  let n = 0;
  const t0 = process.hrtime.bigint();
  const deadline = t0 + BigInt(Math.round(seconds * 1e9));
  let now = t0;
  while (now < deadline) {
    for (let i = 0; i < 100; i++) check(n++);
    now = process.hrtime.bigint();
  }
  return n / (Number(now - t0) / 1e9);
}

// ------------------------------------------------------------------ import (in a child process per store)

/** What the parent tells a child: import `file` into the store at `url`. */
interface ChildTask { kind: typeof CHILD_KIND; label: string; url: string; file: string; signerPem: string; entries: number }
interface ChildResult { ceiling: number; seconds: number; rssBefore: number; rssPeak: number; cpuSeconds: number; devices: number }
const CHILD_KIND = 'hallmark-bench-manifest-import';

/** The process's peak resident set so far (getrusage ru_maxrss, kept by the kernel: no sample can miss it). */
const peakRss = (): number => process.resourceUsage().maxRSS * 1024;

/** In the child: a fresh authority store (CA row, product, line, batch), the ceiling, then the timed import. */
async function importInChild(task: ChildTask): Promise<ChildResult> {
  const store = await Store.open({ url: task.url });
  try {
    const now = nowIso();
    await store.db.insertInto('certificate_authorities').values({ name: 'bench-ca', role: 'intermediate', parent_id: null, status: 'active', subject: 'CN=bench', key_ref: null, key_algorithm: 'ecdsa-p256', ski: '00', path_len: 0, certificate_der: null, csr_der: null, serial: null, not_before: null, not_after: null, created_at: now, updated_at: now }).execute();
    const registry = new Registry(store);
    await registry.createProduct({ name: 'bench', actor: 'bench' });
    await registry.createLine({ name: 'bench', ca: 'bench-ca', actor: 'bench' });
    const batch = await registry.createBatch({ product: 'bench', line: 'bench', quota: task.entries, actor: 'bench' });
    const signers = loadSigners(Buffer.from(task.signerPem), 'bench-signer.pem');

    const ceiling = await verifyCeiling(task.file, signers[0]!.key);
    log(`${task.label}: ceiling ${Math.round(ceiling).toLocaleString('en-US')} verifies/s on one thread; importing ${task.entries.toLocaleString('en-US')} entries`);
    const rssBefore = process.memoryUsage.rss();
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    const report = await importManifest(store, { file: task.file, batch, signers, format: 'microchip', actor: 'bench' });
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const cpu = process.cpuUsage(cpu0);
    const rssPeak = peakRss();
    const devices = Number((await store.db.selectFrom('devices').select((eb) => eb.fn.countAll().as('n')).where('batch_id', '=', batch).executeTakeFirstOrThrow()).n);
    if (report.registered !== task.entries || devices !== task.entries) throw new Error(`${task.label}: ${report.registered} registered, ${devices} devices stored; expected ${task.entries}`);
    return { ceiling, seconds, rssBefore, rssPeak, cpuSeconds: (cpu.user + cpu.system) / 1e6, devices };
  } finally {
    await store.close();
  }
}

const childTask = process.env.HALLMARK_BENCH_MANIFEST_TASK;
if (isMainThread && childTask && process.send) {
  const task = JSON.parse(childTask) as ChildTask;
  if (task.kind === CHILD_KIND) {
    try {
      process.send({ ok: true, result: await importInChild(task) }, () => process.exit(0));
    } catch (err) {
      process.send({ ok: false, error: (err as Error).stack ?? String(err) }, () => process.exit(1));
    }
  }
}

/** Runs one import in a fresh process, so that its memory figures are its own. */
function importInFreshProcess(task: ChildTask): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const child = fork(fileURLToPath(import.meta.url), [], { env: { ...process.env, HALLMARK_BENCH_MANIFEST_TASK: JSON.stringify(task) }, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    let settled = false;
    child.on('message', (m: { ok: true; result: ChildResult } | { ok: false; error: string }) => {
      settled = true;
      if (m.ok) resolve(m.result); else reject(new Error(`${task.label} import failed in the child process: ${m.error}`));
    });
    child.on('error', reject);
    child.on('exit', (code) => { if (!settled) reject(new Error(`${task.label}: the import process exited with code ${code} without a result`)); });
  });
}

async function measure(gen: Generated, label: string, url: string): Promise<Figure> {
  const r = await importInFreshProcess({ kind: CHILD_KIND, label, url, file: gen.file, signerPem: gen.signerPem, entries: ENTRIES });
  const rate = ENTRIES / r.seconds;
  const mib = (b: number): string => `${Math.round(b / 1048576).toLocaleString('en-US')} MiB`;
  log(`${label}: ${ENTRIES.toLocaleString('en-US')} entries in ${r.seconds.toFixed(1)} s = ${Math.round(rate).toLocaleString('en-US')} entries/s (ratio ${(rate / r.ceiling).toFixed(2)}); CPU ${(r.cpuSeconds / r.seconds * 100).toFixed(0)}% of one core; RSS ${mib(r.rssBefore)} before, peak ${mib(r.rssPeak)}; ${r.devices.toLocaleString('en-US')} devices stored`);
  return figure(`manifest import (${label})`, rate, 'entries/s', r.ceiling,
    `${ENTRIES.toLocaleString('en-US')}-entry Microchip manifest (${(gen.bytes / 1e6).toFixed(0)} MB, every ES256 signature verified) in ${r.seconds.toFixed(1)} s; ceiling = one-thread crypto.verify ES256 rate; peak RSS ${mib(r.rssPeak)} (${mib(r.rssBefore)} before the import)`);
}

export async function run(): Promise<Figure[]> {
  const figures: Figure[] = [];
  const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-manifest-'));
  try {
    const gen = await generateManifest(dir, ENTRIES);
    if (STORES.includes('sqlite')) figures.push(await measure(gen, 'sqlite', join(dir, 'registry.db')));
    if (STORES.includes('postgresql')) {
      const name = `hallmark_bench_${randomBytes(4).toString('hex')}`;
      const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
      admin.on('error', () => {});
      await admin.connect();
      try {
        await admin.query(`create database ${name}`);
        figures.push(await measure(gen, 'postgresql', PG_ADMIN_URL.replace(/\/[^/]*$/, `/${name}`)));
      } finally {
        await admin.query(`drop database if exists ${name} with (force)`);
        await admin.end();
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  return figures;
}
