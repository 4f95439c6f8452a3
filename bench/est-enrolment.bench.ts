// EST enrolment (RFC 7030 simpleenroll) against a live HTTPS server on loopback: many concurrent device
// clients, each posting its own CSR with a claim as HTTP Basic credentials, in a batch that registers
// unknown keys on first use. Run 1 keeps TLS connections alive; run 2 opens a fresh TLS connection
// (full handshake) for every enrolment. Measured against what Node's own crypto does on one thread for
// the two signature operations an enrolment needs (the same ceiling as bench/issuance.bench.ts).
//
// The server is a child process (bench/est-server.ts: Authority.open + startServers, as `hallmark
// serve` does, with the per-client EST rate limit off), so clients and server do not share one event
// loop. They do share the machine's cores: the client's own CPU is reported beside the figures.
//
// Env (defaults in brackets): HALLMARK_BENCH_EST_KEEPALIVE enrolments over keep-alive [20000],
// HALLMARK_BENCH_EST_NEWTLS enrolments with a new TLS connection each [5000],
// HALLMARK_BENCH_EST_CONCURRENCY keep-alive clients [64], HALLMARK_BENCH_EST_NEWTLS_CONCURRENCY [32],
// HALLMARK_BENCH_EST_WARMUP untimed enrolments first [1000], HALLMARK_BENCH_EST_MAX_SECONDS a run
// stops sending new enrolments after this long, whatever its count [30], HALLMARK_BENCH_EST_RUNS
// [keepalive,newtls], HALLMARK_BENCH_EST_CPU_PROF=DIR: run the server with --cpu-prof into DIR and
// print a summary of where its main thread spent its time (covers warm-up and every selected run),
// HALLMARK_BENCH_EST_PROCESSES server processes sharing the port through node:cluster [1].

import { fork, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { connect as tlsConnect, createSecureContext, type SecureContext, type TLSSocket } from 'node:tls';
import { cpus, tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Authority } from '../src/authority/authority.js';
import { initAuthority } from '../src/authority/init.js';
import { createClaim } from '../src/enrollment/claims.js';
import { parseCertificate } from '../src/pki/certificate.js';
import { createCsr, parseCsr } from '../src/pki/csr.js';
import { encodeNameString } from '../src/pki/names.js';
import { encodePem } from '../src/pki/pem.js';
import { decodeCertsOnly } from '../src/protocols/est/wire.js';
import type { ServerStats } from './est-server.js';
import { figure, log, type Figure } from './figure.js';
import { benchP256Key } from './keys.js';
import { cryptoCeiling } from './issuance.bench.js';

const envInt = (name: string, fallback: number): number => {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a whole number ≥ 0 (got ${JSON.stringify(v)})`);
  return n;
};

const KEEPALIVE = envInt('HALLMARK_BENCH_EST_KEEPALIVE', 20_000);
const NEWTLS = envInt('HALLMARK_BENCH_EST_NEWTLS', 5_000);
const CONCURRENCY = Math.max(1, envInt('HALLMARK_BENCH_EST_CONCURRENCY', 64));
const NEWTLS_CONCURRENCY = Math.max(1, envInt('HALLMARK_BENCH_EST_NEWTLS_CONCURRENCY', 32));
const WARMUP = envInt('HALLMARK_BENCH_EST_WARMUP', 1_000);
/** A run stops sending new enrolments after this many seconds (the figure is then over what it did). */
const MAX_SECONDS = Math.max(1, envInt('HALLMARK_BENCH_EST_MAX_SECONDS', 30));
const WARMUP_MAX_SECONDS = 15;
const RUNS = (process.env.HALLMARK_BENCH_EST_RUNS ?? 'keepalive,newtls').split(',').map((x) => x.trim());
const CPU_PROF_DIR = process.env.HALLMARK_BENCH_EST_CPU_PROF;
const PASSPHRASE = 'bench-passphrase';

/** Targets from the EST issue, printed beside the figures. */
const TARGET_KEEPALIVE_RATE = 3_000;
const TARGET_NEWTLS_RATE = 1_000;
const TARGET_P99_MS = 50;

/** A run that has not finished after this long fails (never waited on forever). */
const RUN_TIMEOUT_MS = 180_000;
/** One request that has not been answered after this long counts as an error. */
const REQUEST_TIMEOUT_MS = 30_000;

const here = dirname(fileURLToPath(import.meta.url));
const fmt = (n: number): string => Math.round(n).toLocaleString('en-US');

// ------------------------------------------------------------------ CSRs

/**
 * P-256 CSRs with distinct keys, base64 (what an EST client sends), and each CSR's SPKI (to check the
 * certificate that comes back). Keys from bench/keys.ts (why not generateKeyPairSync: there).
 */
function makeCsrs(n: number, prefix: string): { b64: string[]; spki: Buffer[] } {
  const b64: string[] = [];
  const spki: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const privateKey = benchP256Key();
    const der = createCsr({ subject: encodeNameString(`CN=${prefix}-${String(i).padStart(6, '0')},O=Hallmark Bench`), privateKey });
    b64.push(der.toString('base64'));
    spki.push(parseCsr(der).subjectPublicKeyInfo);
  }
  return { b64, spki };
}

// ------------------------------------------------------------------ the server child

interface ServerChild {
  readonly child: ChildProcess;
  readonly httpsUrl: URL;
  stats(): Promise<ServerStats>;
  stop(): Promise<void>;
}

async function startServerChild(home: string, logFile: string): Promise<ServerChild> {
  const logFd = await open(logFile, 'a');
  const execArgv = CPU_PROF_DIR ? ['--cpu-prof', `--cpu-prof-dir=${CPU_PROF_DIR}`] : [];
  const child = fork(join(here, 'est-server.js'), [home], {
    env: { ...process.env, HALLMARK_PASSPHRASE: PASSPHRASE }, execArgv, stdio: ['ignore', logFd.fd, logFd.fd, 'ipc'],
  });
  await logFd.close(); // the child holds its own descriptor
  let exited = false;
  const exitedP = new Promise<void>((resolve) => child.once('exit', () => { exited = true; resolve(); }));
  const httpsUrl = await new Promise<URL>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the EST server did not start within 60 s')), 60_000);
    child.on('message', function ready(m: { type?: string; httpsUrl?: string }) {
      if (m?.type === 'ready') { clearTimeout(timer); child.off('message', ready); resolve(new URL(m.httpsUrl!)); }
    });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`the EST server exited with code ${code} before listening; its log: ${logFile}`)); });
  });
  return {
    child,
    httpsUrl,
    stats: () => new Promise<ServerStats>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the EST server did not answer a stats request')), 30_000);
      child.on('message', function stats(m: ServerStats) {
        if (m?.type === 'stats') { clearTimeout(timer); child.off('message', stats); resolve(m); }
      });
      child.send({ type: 'stats' });
    }),
    async stop() {
      if (exited) return;
      if (child.connected) child.send({ type: 'stop' });
      const timer = setTimeout(() => { if (!exited) child.kill('SIGKILL'); }, 20_000);
      await exitedP;
      clearTimeout(timer);
    },
  };
}

/**
 * CPU time (µs) of each thread of the server processes: "main" (their main threads), "main (system)",
 * "writer" (the store's writer threads, by the thread ids they report), the rest by name. Linux only ({} elsewhere).
 */
function threadCpuUs(processes: readonly { readonly pid: number; readonly writerTid?: number }[]): Record<string, number> {
  const out: Record<string, number> = {};
  const tickUs = 1e6 / 100; // USER_HZ
  for (const { pid, writerTid } of processes) {
    const dir = `/proc/${pid}/task`;
    if (!existsSync(dir)) continue;
    for (const tid of readdirSync(dir)) {
      try {
        const stat = readFileSync(`${dir}/${tid}/stat`, 'utf8');
        const close = stat.lastIndexOf(')');
        const name = Number(tid) === pid ? 'main' : Number(tid) === writerTid ? 'writer' : stat.slice(stat.indexOf('(') + 1, close);
        const f = stat.slice(close + 2).split(' '); // f[0] is field 3 (state); utime, stime are fields 14, 15
        out[name] = (out[name] ?? 0) + (Number(f[11]) + Number(f[12])) * tickUs;
        if (name === 'main') out['main (system)'] = (out['main (system)'] ?? 0) + Number(f[12]) * tickUs;
      } catch { /* thread ended */ }
    }
  }
  return out;
}

/** Busy CPU time of the whole machine, in µs (all cores). */
const machineBusyUs = (): number => cpus().reduce((n, c) => n + c.times.user + c.times.nice + c.times.sys + c.times.irq, 0) * 1000;

// ------------------------------------------------------------------ the clients

interface Outcome { ok: number; sent: number; errors: Map<string, number>; latenciesMs: Float64Array; seconds: number; firstErrors: string[] }

interface RunSpec {
  readonly url: URL;
  readonly ca: string;
  readonly authorization: string;
  readonly csrs: readonly string[];
  readonly spki: readonly Buffer[];
  readonly concurrency: number;
  /** true: each client keeps one TLS connection for all its enrolments; false: a new TLS connection (full handshake) per enrolment. */
  readonly keepAlive: boolean;
  /** No new enrolment is sent after this many seconds. */
  readonly maxSeconds: number;
}

interface HttpAnswer { readonly status: number; readonly body: Buffer }

/**
 * The load generator: a minimal HTTP/1.1 client over raw TLS sockets, one request at a time per
 * connection. It shares the machine's two cores with the server, and Node's https.request cost it
 * ~150 µs per keep-alive enrolment and, with agent: false, built a new TLS SecureContext (parsing the
 * trusted root again) for every connection: ~2.2 ms per new-TLS enrolment, as much as the server's
 * whole enrolment. Here the SecureContext is made once, the request is one write, the answer is framed
 * by Content-Length (or chunked), and answers are checked after the timed window.
 */
class Http1Connection {
  readonly socket: TLSSocket;
  #buf: Buffer = Buffer.alloc(0);
  #waiting: { resolve(a: HttpAnswer): void; reject(e: Error): void } | undefined;
  #closed = false;
  #error: Error | undefined;

  constructor(socket: TLSSocket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.#buf = this.#buf.length === 0 ? chunk : Buffer.concat([this.#buf, chunk]);
      this.#parse();
    });
    const fail = (err: Error): void => {
      this.#closed = true;
      this.#error ??= err;
      const w = this.#waiting;
      this.#waiting = undefined;
      w?.reject(this.#error);
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('connection closed before the answer was complete')));
  }

  get usable(): boolean { return !this.#closed; }

  request(bytes: Buffer): Promise<HttpAnswer> {
    if (this.#closed) return Promise.reject(this.#error ?? new Error('connection closed'));
    return new Promise<HttpAnswer>((resolve, reject) => {
      this.#waiting = { resolve, reject };
      this.socket.write(bytes);
    });
  }

  #parse(): void {
    if (!this.#waiting) return;
    const buf = this.#buf;
    const headEnd = buf.indexOf('\r\n\r\n');
    if (headEnd < 0) return;
    const head = buf.toString('latin1', 0, headEnd);
    const status = Number(head.slice(9, 12));
    const length = /\r\ncontent-length:\s*(\d+)/i.exec(head);
    let body: Buffer;
    let rest: Buffer;
    if (length) {
      const n = Number(length[1]);
      if (buf.length < headEnd + 4 + n) return;
      body = buf.subarray(headEnd + 4, headEnd + 4 + n);
      rest = buf.subarray(headEnd + 4 + n);
    } else if (/\r\ntransfer-encoding:\s*chunked/i.test(head)) {
      const parts: Buffer[] = [];
      let at = headEnd + 4;
      for (;;) {
        const lineEnd = buf.indexOf('\r\n', at);
        if (lineEnd < 0) return;
        const size = parseInt(buf.toString('latin1', at, lineEnd), 16);
        if (buf.length < lineEnd + 2 + size + 2) return;
        if (size === 0) { at = lineEnd + 4; break; }
        parts.push(buf.subarray(lineEnd + 2, lineEnd + 2 + size));
        at = lineEnd + 2 + size + 2;
      }
      body = Buffer.concat(parts);
      rest = buf.subarray(at);
    } else {
      return; // read to the end of the connection: not what the EST server sends
    }
    this.#buf = rest.length ? Buffer.from(rest) : Buffer.alloc(0);
    const w = this.#waiting;
    this.#waiting = undefined;
    w.resolve({ status, body: Buffer.from(body) });
  }
}

/**
 * A TLS connection to the server. OpenSSL verifies the server's chain against the root (a failure is an
 * error); its name is not checked: Node's name check first turns the whole peer chain into JS objects
 * (getPeerCertificate(true), with SHA-1/256/512 fingerprints of every certificate), measured at over
 * half of this client's CPU per new connection — load-generator work that only competes with the server
 * for the two cores.
 */
function openConnection(url: URL, secureContext: SecureContext): Promise<Http1Connection> {
  return new Promise<Http1Connection>((resolve, reject) => {
    const socket = tlsConnect({ host: url.hostname, port: Number(url.port), secureContext, rejectUnauthorized: true, checkServerIdentity: () => undefined }, () => resolve(new Http1Connection(socket)));
    socket.getPeerCertificate = (() => ({})) as unknown as TLSSocket['getPeerCertificate'];
    socket.once('error', reject);
  });
}

/** Checks an answer: 200 with a certs-only CMS holding one certificate for the CSR's key. Throws what is wrong. */
function checkAnswer(answer: HttpAnswer, spki: Buffer): void {
  const text = answer.body.toString('latin1');
  if (answer.status !== 200) throw Object.assign(new Error(`HTTP ${answer.status}: ${text.slice(0, 200).trim()}`), { key: `HTTP ${answer.status} ${text.split(':')[0]!.slice(0, 40)}` });
  const certs = decodeCertsOnly(Buffer.from(text, 'base64'));
  if (certs.length !== 1) throw new Error(`${certs.length} certificates in the answer`);
  if (!parseCertificate(certs[0]!).subjectPublicKeyInfo.equals(spki)) throw new Error('the certificate is not for the CSR key');
}

/**
 * Posts every CSR with at most `concurrency` requests outstanding; checks each answer (200, one
 * certificate, the CSR's key) after the run. `timedEnd` is called as soon as the last answer is in,
 * before the checks (so CPU readings cover the load only).
 */
async function enrolAll(spec: RunSpec, timedEnd?: () => void): Promise<Outcome> {
  const secureContext = createSecureContext({ ca: spec.ca });
  const path = `${spec.url.pathname.replace(/\/$/, '')}/.well-known/est/simpleenroll`;
  const head = `POST ${path} HTTP/1.1\r\nhost: ${spec.url.host}\r\ncontent-type: application/pkcs10\r\nauthorization: ${spec.authorization}\r\n${spec.keepAlive ? '' : 'connection: close\r\n'}content-length: `;
  const latencies = new Float64Array(spec.csrs.length);
  const answers: (HttpAnswer | undefined)[] = new Array(spec.csrs.length);
  const errors = new Map<string, number>();
  const firstErrors: string[] = [];
  let next = 0;
  const fail = (key: string, detail: string): void => {
    errors.set(key, (errors.get(key) ?? 0) + 1);
    if (firstErrors.length < 5) firstErrors.push(detail);
  };
  const connections: Http1Connection[] = [];
  const lane = async (): Promise<void> => {
    let conn: Http1Connection | undefined;
    while (next < spec.csrs.length && process.hrtime.bigint() < deadline) {
      const i = next++;
      const body = spec.csrs[i]!;
      const t0 = process.hrtime.bigint();
      try {
        if (!conn || !conn.usable) {
          conn = await openConnection(spec.url, secureContext);
          connections.push(conn);
        }
        const timer = setTimeout(() => conn!.socket.destroy(new Error(`no answer within ${REQUEST_TIMEOUT_MS / 1000} s`)), REQUEST_TIMEOUT_MS);
        try {
          answers[i] = await conn.request(Buffer.from(`${head}${body.length}\r\n\r\n${body}`, 'latin1'));
        } finally {
          clearTimeout(timer);
        }
      } catch (err) {
        fail(`request ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, `#${i}: ${(err as Error).message}`);
      }
      latencies[i] = Number(process.hrtime.bigint() - t0) / 1e6;
      if (!spec.keepAlive && conn) {
        conn.socket.destroy();
        conn = undefined;
      }
    }
    conn?.socket.end();
  };
  const start = process.hrtime.bigint();
  const deadline = start + BigInt(Math.round(spec.maxSeconds * 1e9));
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      Promise.all(Array.from({ length: Math.min(spec.concurrency, spec.csrs.length) }, lane)),
      new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`EST run did not finish in ${RUN_TIMEOUT_MS / 1000} s (${next}/${spec.csrs.length} sent)`)), RUN_TIMEOUT_MS); }),
    ]);
  } finally {
    clearTimeout(timer);
    for (const c of connections) c.socket.destroy();
  }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  timedEnd?.();
  // Untimed: every answer is checked (status, one certificate, the CSR's key).
  let ok = 0;
  for (let i = 0; i < next; i++) {
    const a = answers[i];
    if (!a) continue; // counted above
    try {
      checkAnswer(a, spec.spki[i]!);
      ok++;
    } catch (err) {
      fail((err as { key?: string }).key ?? 'bad answer', `#${i}: ${(err as Error).message}`);
    }
  }
  return { ok, sent: next, errors, latenciesMs: latencies.subarray(0, next), seconds, firstErrors };
}

const percentile = (sorted: Float64Array, p: number): number => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))]!;

interface Measured {
  readonly label: string;
  readonly count: number;
  readonly planned: number;
  readonly concurrency: number;
  readonly rate: number;
  readonly p50: number;
  readonly p99: number;
  readonly max: number;
  readonly errors: number;
  readonly errorSummary: string;
  readonly othersLoad: number;
  /** CPU per enrolment (µs): server by thread group, and this (client) process. */
  readonly serverUs: Record<string, number>;
  /** Units per group commit in the store's writer thread, when one runs. */
  readonly unitsPerCommit?: number;
  readonly clientUs: number;
}

async function measuredRun(label: string, server: ServerChild, spec: RunSpec): Promise<Measured> {
  const stats0 = await server.stats();
  const rows0 = stats0.certificates;
  const writerTid = stats0.writer?.threadId;
  // With several server processes (HALLMARK_BENCH_EST_PROCESSES) the child is their cluster primary: count it and them.
  const processes = [{ pid: server.child.pid! }, ...(stats0.processes ?? []).filter((p) => p.pid !== server.child.pid)];
  if (stats0.processes?.length === 1) Object.assign(processes[0]!, { writerTid });
  const threads0 = threadCpuUs(processes);
  const busy0 = machineBusyUs();
  const client0 = process.cpuUsage();
  let client = client0;
  let busy = 0;
  let threads1: Record<string, number> = {};
  const out = await enrolAll(spec, () => {
    client = process.cpuUsage(client0);
    busy = machineBusyUs() - busy0;
    threads1 = threadCpuUs(processes);
  });
  const stats = await server.stats();
  const n = out.sent;
  const serverTotal = Object.keys(threads1).filter((k) => k !== 'main (system)').reduce((s, k) => s + threads1[k]! - (threads0[k] ?? 0), 0);
  const othersLoad = Math.max(0, busy - serverTotal - client.user - client.system) / (out.seconds * 1e6 * cpus().length);
  // Durable enrolment: every 200 left exactly one committed certificate row.
  if (stats.certificates - rows0 !== out.ok) throw new Error(`${label}: certificates grew by ${stats.certificates - rows0}, but ${out.ok} enrolments succeeded`);
  // Node 20 names every thread "node": the libuv pool (CSR verify, certificate sign) and V8's GC and
  // compiler helpers can only be told from the main thread (and the store's writer thread, whose id it
  // reports), not from each other.
  const groups: Record<string, number> = { main: 0, 'main (system)': 0, writer: 0, other: 0 };
  for (const [k, v] of Object.entries(threads1)) {
    const d = v - (threads0[k] ?? 0);
    const g = k === 'main' || k === 'main (system)' || k === 'writer' ? k : 'other';
    groups[g] = groups[g]! + d / n;
  }
  const commits = stats.writer && stats0.writer ? { groups: stats.writer.groups - stats0.writer.groups, units: stats.writer.units - stats0.writer.units } : undefined;
  const sorted = out.latenciesMs.slice().sort();
  const errors = n - out.ok;
  const errorSummary = [...out.errors].map(([k, v]) => `${v} × ${k}`).join(', ');
  const m: Measured = {
    label, count: n, planned: spec.csrs.length, concurrency: spec.concurrency, rate: out.ok / out.seconds, p50: percentile(sorted, 0.5), p99: percentile(sorted, 0.99), max: sorted[sorted.length - 1]!,
    errors, errorSummary, othersLoad, serverUs: groups, clientUs: (client.user + client.system) / n,
    unitsPerCommit: commits && commits.groups > 0 ? commits.units / commits.groups : undefined,
  };
  if (n < spec.csrs.length) log(`${label}: stopped sending after ${spec.maxSeconds} s (HALLMARK_BENCH_EST_MAX_SECONDS): ${fmt(n)} of ${fmt(spec.csrs.length)} enrolments sent`);
  log(`${label}: ${fmt(out.ok)}/${fmt(n)} enrolled in ${out.seconds.toFixed(2)} s, ${spec.concurrency} clients: ${fmt(m.rate)}/s, ` +
    `p50 ${m.p50.toFixed(1)} ms, p99 ${m.p99.toFixed(1)} ms, max ${m.max.toFixed(1)} ms; errors ${errors}${errors ? ` (${errorSummary})` : ''}; ` +
    `other processes used ${Math.round(othersLoad * 100)}% of the machine meanwhile`);
  log(`${label}: CPU per enrolment: server ${fmt(groups.main! + groups.writer! + groups.other!)} µs = main thread ${fmt(groups.main!)} µs (${fmt(groups['main (system)']!)} of it in the kernel)` +
    `${groups.writer ? ` + store writer thread${processes.length > 1 ? 's' : ''} ${fmt(groups.writer)} µs` : ''} + other threads (libuv pool, V8 helpers, checkpointer) ${fmt(groups.other!)} µs; ` +
    `client (this process) ${fmt(m.clientUs)} µs${m.unitsPerCommit ? `; ${m.unitsPerCommit.toFixed(1)} enrolments per commit` : ''}`);
  for (const e of out.firstErrors) log(`${label}: error ${e}`);
  return m;
}

// ------------------------------------------------------------------ profile summary

interface ProfileNode { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }
interface CpuProfile { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[] }

/** What a function's self time is charged to, by its script (first match wins). */
const CATEGORIES: readonly [string, RegExp][] = [
  ['(garbage collector)', /^\(garbage collector\)$/],
  ['(program): native work with no JS on the stack (TLS records and handshakes, libuv, socket I/O)', /^\(program\)$/],
  ['SQLite driver (statement run + COMMIT/fsync, better-sqlite3 via Kysely)', /better-sqlite3|kysely\/dist\/esm\/dialect\/sqlite|store\/database/],
  ['Kysely query building and compiling', /kysely/],
  ['audit log (hash chain, canonical JSON)', /src\/audit\//],
  ['logging (pino)', /pino|sonic-boom|fast-redact|quick-format|safe-stable-stringify|thread-stream/],
  ['Node TLS (JS side: _tls_wrap, tls)', /node:_tls|node:tls|node:internal\/tls/],
  ['Node HTTP (parser, server, outgoing)', /node:_http|node:http|node:internal\/http/],
  ['Fastify (routing, hooks, reply)', /fastify|find-my-way|avvio|light-my-request|fast-json-stringify|@fastify/],
  ['Node crypto (key import, WebCrypto, sign/verify hand-off)', /node:internal\/crypto|node:crypto/],
  ['CSR parse/verify (src/pki/csr.ts)', /src\/pki\/csr/],
  ['PKI encoding/parsing (src/pki other)', /src\/pki\//],
  ['certificate recorder (group commit)', /src\/store\/certificate-recorder/],
  ['issuance (src/authority)', /src\/authority\//],
  ['registry', /src\/registry\//],
  ['enrolment + EST routes', /src\/enrollment\/|src\/protocols\//],
  ['Node streams, events, timers, net', /node:internal\/streams|node:stream|node:events|node:internal\/timers|node:net|node:internal\/stream_base|node:internal\/process|node:internal\/async_hooks|node:buffer|node:internal\/util/],
];

/** Self time by category and the top functions, from a V8 .cpuprofile (main thread, sampled wall clock). */
export function summariseProfile(file: string): string {
  const p = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const self = new Map<number, number>();
  p.samples.forEach((id, i) => self.set(id, (self.get(id) ?? 0) + (p.timeDeltas[i] ?? 0)));
  const byNode = new Map(p.nodes.map((n) => [n.id, n]));
  let total = 0;
  let idle = 0;
  const cats = new Map<string, number>();
  const fns = new Map<string, number>();
  for (const [id, us] of self) {
    const f = byNode.get(id)!.callFrame;
    if (f.functionName === '(idle)') { idle += us; continue; }
    total += us;
    const where = f.url || f.functionName;
    const cat = CATEGORIES.find(([, re]) => re.test(where) || re.test(f.functionName))?.[0] ?? 'other JS';
    cats.set(cat, (cats.get(cat) ?? 0) + us);
    const key = `${f.functionName || '(anonymous)'} ${f.url ? `${basename(f.url)}:${f.lineNumber + 1}` : ''}`.trim();
    fns.set(key, (fns.get(key) ?? 0) + us);
  }
  const pct = (us: number): string => `${((us / total) * 100).toFixed(1).padStart(5)} %`;
  const lines = [`${(total / 1e6).toFixed(1)} s busy + ${(idle / 1e6).toFixed(1)} s idle (${file})`, 'self time by category:'];
  for (const [c, us] of [...cats].sort((a, b) => b[1] - a[1])) lines.push(`  ${pct(us)}  ${c}`);
  lines.push('top functions by self time:');
  for (const [f, us] of [...fns].sort((a, b) => b[1] - a[1]).slice(0, 25)) lines.push(`  ${pct(us)}  ${f}`);
  return lines.join('\n');
}

// ------------------------------------------------------------------ run

export async function run(): Promise<Figure[]> {
  const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-est-'));
  const logFile = join(dir, 'server.log');
  let server: ServerChild | undefined;
  try {
    const doKeepAlive = RUNS.includes('keepalive') && KEEPALIVE > 0;
    const doNewTls = RUNS.includes('newtls') && NEWTLS > 0;
    const total = WARMUP + (doKeepAlive ? KEEPALIVE : 0) + (doNewTls ? NEWTLS : 0);
    log(`generating ${fmt(total)} P-256 CSRs with distinct keys…`);
    const warm = makeCsrs(WARMUP, 'est-warmup');
    const ka = makeCsrs(doKeepAlive ? KEEPALIVE : 0, 'est-keepalive');
    const nt = makeCsrs(doNewTls ? NEWTLS : 0, 'est-newtls');

    // The home: as the tests make it (initAuthority, file keys), then a product, a line on issuing-1, a
    // batch that registers unknown keys on first use, and one claim with a use for every enrolment.
    const home = join(dir, 'home');
    await initAuthority({ home, rootDir: join(dir, 'root'), org: 'Hallmark Bench', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'bench' });
    const authority = await Authority.open(home, PASSPHRASE);
    let basic: string;
    let rootPem: string;
    try {
      await authority.registry.createProduct({ name: 'est-bench', actor: 'bench' });
      await authority.registry.createLine({ name: 'est-bench-line', ca: 'issuing-1', actor: 'bench' });
      const batch = await authority.registry.createBatch({ product: 'est-bench', line: 'est-bench-line', quota: total, allowUnregistered: true, actor: 'bench' });
      ({ basic } = await createClaim(authority.store, { batch, uses: total, ttlMs: 86_400_000, perMinute: 10_000_000, actor: 'bench' }));
      const [root] = await authority.caChain(await authority.rootName(), false);
      rootPem = encodePem('CERTIFICATE', root!);
    } finally {
      await authority.close();
    }

    const ceiling = cryptoCeiling(Buffer.from((ka.b64[0] ?? nt.b64[0] ?? warm.b64[0])!, 'base64'));
    log(`ceiling: crypto.verify + crypto.sign (P-256, one thread, sync): ${fmt(ceiling)} pairs/s`);

    server = await startServerChild(home, logFile);
    log(`EST server (child process ${server.child.pid}${CPU_PROF_DIR ? `, --cpu-prof into ${CPU_PROF_DIR}` : ''}) at ${server.httpsUrl.href}; log ${logFile}`);
    const authorization = `Basic ${Buffer.from(basic).toString('base64')}`;
    const base = { url: server.httpsUrl, ca: rootPem, authorization };

    if (WARMUP > 0) {
      const w = await enrolAll({ ...base, csrs: warm.b64, spki: warm.spki, concurrency: CONCURRENCY, keepAlive: true, maxSeconds: WARMUP_MAX_SECONDS });
      log(`warm-up: ${fmt(w.ok)}/${fmt(w.sent)} enrolled in ${w.seconds.toFixed(2)} s (untimed)`);
      if (w.ok === 0) throw new Error(`no warm-up enrolment succeeded: ${w.firstErrors.join('; ')}; server log ${logFile}`);
    }

    let sent = WARMUP;
    const unit = 'enrolments/s';
    const out: Figure[] = [];
    const met = (ok: boolean): string => (ok ? 'met' : 'MISSED');
    const describe = (m: Measured, rateTarget: number): string =>
      `${fmt(m.count)} enrolments${m.count < m.planned ? ` (of ${fmt(m.planned)}: stopped after ${MAX_SECONDS} s)` : ''}, ${m.concurrency} concurrent clients; target ≥ ${fmt(rateTarget)}/s ${met(m.rate >= rateTarget)}; ` +
      `p50 ${m.p50.toFixed(1)} ms, p99 ${m.p99.toFixed(1)} ms (target < ${TARGET_P99_MS} ms at 64 clients${m.concurrency === 64 ? ` ${met(m.p99 < TARGET_P99_MS)}` : ', not this concurrency'}); ` +
      `errors ${m.errors}${m.errors ? ` (${m.errorSummary})` : ''}; server CPU/enrolment ${fmt(m.serverUs.main! + m.serverUs.writer! + m.serverUs.other!)} µs: main ${fmt(m.serverUs.main!)} µs (kernel ${fmt(m.serverUs['main (system)']!)}), writer ${fmt(m.serverUs.writer!)} µs, other threads ${fmt(m.serverUs.other!)} µs; ` +
      `client ${fmt(m.clientUs)} µs; other processes ${Math.round(m.othersLoad * 100)}% of the machine`;
    const push = (m: Measured, name: string, rateTarget: number): void => {
      out.push(figure(`EST enrolment, ${name}`, m.rate, unit, ceiling, describe(m, rateTarget)));
      out.push(figure(`EST enrolment p50 latency, ${name}`, m.p50, 'ms', null));
      out.push(figure(`EST enrolment p99 latency, ${name}`, m.p99, 'ms', null, `target < ${TARGET_P99_MS} ms at 64 clients`));
    };

    if (doKeepAlive) {
      const m = await measuredRun('keep-alive', server, { ...base, csrs: ka.b64, spki: ka.spki, concurrency: CONCURRENCY, keepAlive: true, maxSeconds: MAX_SECONDS });
      sent += m.count;
      push(m, `keep-alive, ${CONCURRENCY} clients`, TARGET_KEEPALIVE_RATE);
    }
    if (doNewTls) {
      const m = await measuredRun('new TLS each', server, { ...base, csrs: nt.b64, spki: nt.spki, concurrency: NEWTLS_CONCURRENCY, keepAlive: false, maxSeconds: MAX_SECONDS });
      sent += m.count;
      push(m, `new TLS connection each, ${NEWTLS_CONCURRENCY} clients`, TARGET_NEWTLS_RATE);
    }
    const logBytes = statSync(logFile).size;
    log(`server log: ${fmt(logBytes / Math.max(1, sent))} bytes per enrolment (pino, info level, as \`hallmark serve\`)`);
    await server.stop();
    server = undefined;
    if (CPU_PROF_DIR) {
      // --cpu-prof writes one profile per thread: CPU.<date>.<time>.<pid>.<thread id>.<n>.cpuprofile, the main
      // thread being 0; the others are the store's checkpointer and writer threads. The newest process's, main first.
      const files = readdirSync(CPU_PROF_DIR).filter((f) => f.endsWith('.cpuprofile')).map((f) => join(CPU_PROF_DIR, f))
        .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
      const pid = files[0] ? basename(files[0]).split('.')[3] : undefined;
      const threadOf = (f: string): number => Number(basename(f).split('.')[4]);
      for (const f of files.filter((x) => basename(x).split('.')[3] === pid).sort((a, b) => threadOf(a) - threadOf(b))) {
        log(`CPU profile of the EST server, ${threadOf(f) === 0 ? 'main thread' : `worker thread ${threadOf(f)} (store checkpointer or writer)`}:\n${summariseProfile(f)}`);
      }
    }
    log('ceiling = Node crypto.verify + crypto.sign pairs/s, P-256, one thread (as bench/issuance.bench.ts); every figure shares it');
    return out;
  } catch (err) {
    const tail = existsSync(logFile) ? (await readFile(logFile, 'utf8')).split('\n').slice(-20).join('\n') : '';
    if (tail) log(`server log (last lines):\n${tail}`);
    throw err;
  } finally {
    await server?.stop().catch(() => {});
    await rm(dir, { recursive: true, force: true });
  }
}
