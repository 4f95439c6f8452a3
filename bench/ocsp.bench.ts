// OCSP responses per second against a live server under concurrent keep-alive load: POST /ocsp
// (application/ocsp-request) on the plain HTTP listener, as RFC 5019 clients and `openssl ocsp` send it.
//
//   cached     requests without nonce for a set of issued certificates (some revoked): after one untimed
//              pass that signs each once, every answer comes from the responder's cache of pre-signed
//              responses (no signature). Ceiling: GET /hello -> "hello world" on the same kind of server
//              (bench/ocsp-server.ts: an app built by the same buildHttpApp, same logger, same process),
//              under the same client load, measured in the same run, alternating with the OCSP rounds.
//   uncached   every request carries a fresh nonce (RFC 8954), so every answer is a status read from the
//              store plus one ECDSA P-256 signature. Ceiling: one-thread crypto.sign rate (P-256, a
//              response-sized message), measured in this process before the server starts.
//
// The server is a child process (bench/ocsp-server.ts: Authority.open + startServers as `hallmark serve`,
// pino at info level into a log file). The client is a minimal HTTP/1.1 keep-alive load generator on raw
// sockets (one request in flight per connection, pre-built request bytes, Content-Length framing), so
// that the client, which shares the machine's two cores with the server, costs as little as it can.
// Every answer is kept and checked after the timed window: HTTP 200, application/ocsp-response, a
// successful OCSPResponse that parseOcspResponse reads, for the asked serial, with the expected status
// (good / revoked), the nonce echoed, and a signature that verifies (verifyOcspResponse) — a cached answer
// byte-identical to one already checked counts as checked. Anything else is an error, counted.
//
// Env (defaults in brackets): HALLMARK_BENCH_OCSP_CERTS issued certificates [1000] (every 10th revoked),
// HALLMARK_BENCH_OCSP_CONCURRENCY connections [64], HALLMARK_BENCH_OCSP_SECONDS per timed window [8],
// HALLMARK_BENCH_OCSP_ROUNDS hello/cached rounds, best taken [2], HALLMARK_BENCH_OCSP_RUNS [cached,uncached],
// HALLMARK_BENCH_OCSP_CPU_PROF=DIR (server child under --cpu-prof).

import { fork, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync, randomBytes, sign as cryptoSign } from 'node:crypto';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Authority } from '../src/authority/authority.js';
import { initAuthority } from '../src/authority/init.js';
import { certIdFor, encodeOcspRequest, nonceBytes, parseOcspResponse, verifyOcspResponse } from '../src/protocols/ocsp/ocsp.js';
import { figure, log, type Figure } from './figure.js';
import { makeCsrs } from './issuance.bench.js';
import type { OcspServerStats } from './ocsp-server.js';

const envInt = (name: string, fallback: number): number => {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a whole number ≥ 0 (got ${JSON.stringify(v)})`);
  return n;
};

const CERTS = Math.max(1, envInt('HALLMARK_BENCH_OCSP_CERTS', 1000));
const CONCURRENCY = Math.max(1, envInt('HALLMARK_BENCH_OCSP_CONCURRENCY', 64));
const SECONDS = Math.max(1, envInt('HALLMARK_BENCH_OCSP_SECONDS', 8));
const ROUNDS = Math.max(1, envInt('HALLMARK_BENCH_OCSP_ROUNDS', 2));
const RUNS = (process.env.HALLMARK_BENCH_OCSP_RUNS ?? 'cached,uncached').split(',').map((x) => x.trim());
const CPU_PROF_DIR = process.env.HALLMARK_BENCH_OCSP_CPU_PROF;
const PASSPHRASE = 'bench-passphrase';
const CA = 'issuing-1';

/** Target from the revocation issue: cached answers at ≥ 50 % of the hello-world rate. */
const TARGET_CACHED_RATIO = 0.5;
/** Nonce requests made before the uncached run (more than it can send in SECONDS at today's rates). */
const NONCE_REQUESTS_PER_SECOND = 8_000;

const here = dirname(fileURLToPath(import.meta.url));
const fmt = (n: number): string => Math.round(n).toLocaleString('en-US');

// ------------------------------------------------------------------ the server child

interface ServerChild {
  readonly child: ChildProcess;
  readonly ocspUrl: URL;
  readonly helloUrl: URL;
  stats(): Promise<OcspServerStats>;
  stop(): Promise<void>;
}

async function startServerChild(home: string, logFile: string): Promise<ServerChild> {
  const logFd = await open(logFile, 'a');
  const execArgv = CPU_PROF_DIR ? ['--cpu-prof', `--cpu-prof-dir=${CPU_PROF_DIR}`] : [];
  const child = fork(join(here, 'ocsp-server.js'), [home], {
    env: { ...process.env, HALLMARK_PASSPHRASE: PASSPHRASE }, execArgv, stdio: ['ignore', logFd.fd, logFd.fd, 'ipc'],
  });
  await logFd.close();
  let exited = false;
  const exitedP = new Promise<void>((resolve) => child.once('exit', () => { exited = true; resolve(); }));
  const urls = await new Promise<{ httpUrl: string; helloUrl: string }>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the OCSP server did not start within 60 s')), 60_000);
    child.on('message', function ready(m: { type?: string; httpUrl?: string; helloUrl?: string }) {
      if (m?.type === 'ready') { clearTimeout(timer); child.off('message', ready); resolve(m as { httpUrl: string; helloUrl: string }); }
    });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`the OCSP server exited with code ${code} before listening; its log: ${logFile}`)); });
  });
  return {
    child,
    ocspUrl: new URL('/ocsp', urls.httpUrl),
    helloUrl: new URL(urls.helloUrl),
    stats: () => new Promise<OcspServerStats>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the OCSP server did not answer a stats request')), 30_000);
      child.on('message', function stats(m: OcspServerStats) {
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

/** CPU time (µs, user + system, all threads) of process `pid` so far. Linux only (0 elsewhere). */
function processCpuUs(pid: number): number {
  const file = `/proc/${pid}/stat`;
  if (!existsSync(file)) return 0;
  const stat = readFileSync(file, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) * (1e6 / 100);
}

/** Busy CPU time of the whole machine, in µs (all cores). */
const machineBusyUs = (): number => cpus().reduce((n, c) => n + c.times.user + c.times.nice + c.times.sys + c.times.irq, 0) * 1000;

// ------------------------------------------------------------------ the load generator

interface Answer { readonly status: number; readonly contentType: string; readonly body: Buffer }

interface LoadResult {
  readonly seconds: number;
  readonly sent: number;
  /** Answers by request index (the index into `requests`), in the order they came. */
  readonly answers: { index: number; answer: Answer }[] | undefined;
  readonly transportErrors: Map<string, number>;
  readonly completed: number;
}

const CRLF2 = Buffer.from('\r\n\r\n');

/**
 * `concurrency` keep-alive connections, each with one request in flight, for `seconds` (or until
 * `requests` is used up when `cycle` is false). Request i is requests[i % length].
 */
async function load(url: URL, requests: readonly Buffer[], opts: { concurrency: number; seconds: number; cycle: boolean; keep: boolean }): Promise<LoadResult> {
  const answers: { index: number; answer: Answer }[] | undefined = opts.keep ? [] : undefined;
  const transportErrors = new Map<string, number>();
  let next = 0;
  let completed = 0;
  const start = process.hrtime.bigint();
  const deadline = start + BigInt(opts.seconds) * 1_000_000_000n;
  const take = (): number | undefined => {
    if (process.hrtime.bigint() >= deadline) return undefined;
    if (!opts.cycle && next >= requests.length) return undefined;
    return next++;
  };
  const lane = (): Promise<void> => new Promise<void>((resolve) => {
    const socket: Socket = connect({ host: url.hostname, port: Number(url.port), noDelay: true });
    let buffered: Buffer = Buffer.alloc(0);
    let current = -1;
    let bodyStart = -1;
    let bodyLength = -1;
    let status = 0;
    let contentType = '';
    let done = false;
    const finish = (err?: string): void => {
      if (done) return;
      done = true;
      if (err) transportErrors.set(err, (transportErrors.get(err) ?? 0) + 1);
      socket.destroy();
      resolve();
    };
    const sendNext = (): void => {
      const i = take();
      if (i === undefined) return finish();
      current = i;
      socket.write(requests[i % requests.length]!);
    };
    socket.on('connect', sendNext);
    socket.on('error', (e: NodeJS.ErrnoException) => finish(`socket ${e.code ?? e.message}`));
    socket.on('close', () => finish(current >= 0 && bodyLength !== -2 ? 'connection closed by the server' : undefined));
    socket.on('data', (chunk: Buffer) => {
      buffered = buffered.length ? Buffer.concat([buffered, chunk]) : chunk;
      for (;;) {
        if (bodyStart < 0) {
          const end = buffered.indexOf(CRLF2);
          if (end < 0) return;
          const head = buffered.toString('latin1', 0, end);
          status = Number(head.slice(9, 12));
          const cl = /\r\ncontent-length:\s*(\d+)/i.exec(head);
          const ct = /\r\ncontent-type:\s*([^\r]*)/i.exec(head);
          if (!cl) return finish('answer without Content-Length');
          contentType = ct ? ct[1]! : '';
          bodyStart = end + 4;
          bodyLength = Number(cl[1]);
        }
        if (buffered.length < bodyStart + bodyLength) return;
        const body = buffered.subarray(bodyStart, bodyStart + bodyLength);
        buffered = buffered.subarray(bodyStart + bodyLength);
        bodyStart = -1;
        completed++;
        answers?.push({ index: current, answer: { status, contentType, body: Buffer.from(body) } });
        if (buffered.length === 0) buffered = Buffer.alloc(0);
        const i = take();
        if (i === undefined) { bodyLength = -2; return finish(); }
        current = i;
        socket.write(requests[i % requests.length]!);
      }
    });
  });
  await Promise.all(Array.from({ length: opts.concurrency }, lane));
  return { seconds: Number(process.hrtime.bigint() - start) / 1e9, sent: next, answers, transportErrors, completed };
}

const post = (url: URL, body: Buffer): Buffer => Buffer.concat([
  Buffer.from(`POST ${url.pathname} HTTP/1.1\r\nHost: ${url.host}\r\nContent-Type: application/ocsp-request\r\nContent-Length: ${body.length}\r\n\r\n`, 'latin1'),
  body,
]);

// ------------------------------------------------------------------ checking answers

interface Expectation { readonly serial: string; readonly status: 'good' | 'revoked'; readonly nonce?: Buffer }

interface Checked { ok: number; errors: Map<string, number>; firstErrors: string[] }

function checkAnswers(result: LoadResult, expect: (index: number) => Expectation, issuerDer: Buffer, kind: 'hello' | 'ocsp'): Checked {
  const out: Checked = { ok: 0, errors: new Map(), firstErrors: [] };
  const fail = (key: string, detail: string): void => {
    out.errors.set(key, (out.errors.get(key) ?? 0) + 1);
    if (out.firstErrors.length < 5) out.firstErrors.push(detail);
  };
  const verified = new Map<string, Buffer[]>(); // serial -> bodies already checked in full
  for (const { index, answer } of result.answers ?? []) {
    if (answer.status !== 200) { fail(`HTTP ${answer.status}`, `#${index}: HTTP ${answer.status} ${answer.body.toString('latin1', 0, 120)}`); continue; }
    if (kind === 'hello') {
      if (answer.body.toString('latin1') === 'hello world') out.ok++; else fail('not hello world', `#${index}: ${answer.body.toString('latin1', 0, 60)}`);
      continue;
    }
    if (answer.contentType !== 'application/ocsp-response') { fail('content type', `#${index}: Content-Type ${answer.contentType}`); continue; }
    const e = expect(index);
    const seen = verified.get(e.serial);
    if (!e.nonce && seen?.some((b) => b.equals(answer.body))) { out.ok++; continue; }
    try {
      const parsed = parseOcspResponse(answer.body);
      if (parsed.status !== 'successful' || !parsed.basic) throw new Error(`OCSP status ${parsed.status}`);
      const single = parsed.basic.responses;
      if (single.length !== 1 || single[0]!.serialHex !== e.serial) throw new Error(`answers ${single.map((s) => s.serialHex).join(',')}, asked ${e.serial}`);
      if (single[0]!.status !== e.status) throw new Error(`serial ${e.serial} is ${single[0]!.status}, expected ${e.status}`);
      if (e.nonce && !(parsed.basic.nonce && nonceBytes(parsed.basic.nonce).equals(e.nonce))) throw new Error('nonce not echoed');
      if (!e.nonce && parsed.basic.nonce) throw new Error('a nonce in an answer to a request without one');
      verifyOcspResponse(parsed, issuerDer);
      if (!e.nonce) verified.set(e.serial, [...(seen ?? []), answer.body]);
      out.ok++;
    } catch (err) {
      fail('bad OCSP answer', `#${index}: ${(err as Error).message}`);
    }
  }
  for (const [k, v] of result.transportErrors) { out.errors.set(k, (out.errors.get(k) ?? 0) + v); if (out.firstErrors.length < 5) out.firstErrors.push(`${v} × ${k}`); }
  return out;
}

// ------------------------------------------------------------------ ceilings

/** One-thread crypto.sign rate, P-256, a response-sized message (best of three 0.5 s windows). */
function signCeiling(): number {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const tbs = randomBytes(180); // a one-CertID ResponseData is ~170-230 bytes
  let best = 0;
  for (let round = 0; round < 3; round++) {
    let n = 0;
    const start = process.hrtime.bigint();
    const end = start + 500_000_000n;
    let now = start;
    while (now < end) {
      for (let k = 0; k < 50; k++) cryptoSign('sha256', tbs, privateKey);
      n += 50;
      now = process.hrtime.bigint();
    }
    best = Math.max(best, n / (Number(now - start) / 1e9));
  }
  return best;
}

// ------------------------------------------------------------------ run

interface Window {
  readonly label: string;
  readonly rate: number;
  readonly completed: number;
  readonly seconds: number;
  readonly errors: number;
  readonly errorSummary: string;
  readonly serverCpuUs: number;
  readonly clientCpuUs: number;
  readonly othersLoad: number;
  readonly signatures: number;
  readonly cacheHits: number;
}

async function window(label: string, server: ServerChild, url: URL, requests: readonly Buffer[], cycle: boolean, expect: (i: number) => Expectation, issuerDer: Buffer, kind: 'hello' | 'ocsp'): Promise<Window> {
  const s0 = await server.stats();
  const cpu0 = processCpuUs(server.child.pid!);
  const busy0 = machineBusyUs();
  const client0 = process.cpuUsage();
  const r = await load(url, requests, { concurrency: CONCURRENCY, seconds: SECONDS, cycle, keep: true });
  const client = process.cpuUsage(client0);
  const busy = machineBusyUs() - busy0;
  const serverCpu = processCpuUs(server.child.pid!) - cpu0;
  const s1 = await server.stats();
  const checked = checkAnswers(r, expect, issuerDer, kind);
  const errors = [...checked.errors.values()].reduce((a, b) => a + b, 0);
  const w: Window = {
    label, rate: checked.ok / r.seconds, completed: r.completed, seconds: r.seconds, errors,
    errorSummary: [...checked.errors].map(([k, v]) => `${v} × ${k}`).join(', '),
    serverCpuUs: serverCpu / Math.max(1, r.completed), clientCpuUs: (client.user + client.system) / Math.max(1, r.completed),
    othersLoad: Math.max(0, busy - serverCpu - client.user - client.system) / (r.seconds * 1e6 * cpus().length),
    signatures: s1.signatures - s0.signatures, cacheHits: s1.cacheHits - s0.cacheHits,
  };
  log(`${label}: ${fmt(checked.ok)} good answers in ${r.seconds.toFixed(2)} s over ${CONCURRENCY} keep-alive connections: ${fmt(w.rate)}/s; errors ${errors}${errors ? ` (${w.errorSummary})` : ''}; ` +
    (kind === 'ocsp' ? `signatures ${fmt(w.signatures)}, cache hits ${fmt(w.cacheHits)}; ` : '') +
    `CPU per answer: server ${fmt(w.serverCpuUs)} µs, client ${fmt(w.clientCpuUs)} µs; other processes ${Math.round(w.othersLoad * 100)}% of the machine`);
  for (const e of checked.firstErrors) log(`${label}: error ${e}`);
  return w;
}

export async function run(): Promise<Figure[]> {
  const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-ocsp-'));
  const logFile = join(dir, 'server.log');
  let server: ServerChild | undefined;
  try {
    const home = join(dir, 'home');
    await initAuthority({ home, rootDir: join(dir, 'root'), org: 'Hallmark Bench', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'bench' });
    log(`issuing ${fmt(CERTS)} device certificates (every 10th then revoked)…`);
    const csrs = makeCsrs(CERTS, 'ocsp-bench');
    const authority = await Authority.open(home, PASSPHRASE);
    const serials: string[] = [];
    const revoked = new Set<string>();
    let issuerDer: Buffer;
    try {
      for (const csr of csrs) serials.push((await authority.issue({ csr, profile: 'device', actor: 'bench' })).serial);
      for (let i = 0; i < serials.length; i += 10) {
        await authority.revoke({ serial: serials[i]!, ca: CA }, 'keyCompromise', 'bench');
        revoked.add(serials[i]!);
      }
      [issuerDer] = await authority.caChain(CA, false) as [Buffer];
    } finally {
      await authority.close();
    }
    const statusOf = (serial: string): 'good' | 'revoked' => (revoked.has(serial) ? 'revoked' : 'good');
    const certIds = serials.map((s) => certIdFor(issuerDer, s));

    const ceiling = signCeiling();
    log(`ceiling (uncached): crypto.sign P-256, one thread, sync: ${fmt(ceiling)} signatures/s`);

    server = await startServerChild(home, logFile);
    log(`OCSP server (child process ${server.child.pid}${CPU_PROF_DIR ? `, --cpu-prof into ${CPU_PROF_DIR}` : ''}) at ${server.ocspUrl.href}, hello world at ${server.helloUrl.href}; log ${logFile}`);
    const ocspUrl = server.ocspUrl;
    const cachedRequests = certIds.map((id) => post(ocspUrl, encodeOcspRequest([id])));
    const helloRequests = [Buffer.from(`GET ${server.helloUrl.pathname} HTTP/1.1\r\nHost: ${server.helloUrl.host}\r\n\r\n`, 'latin1')];
    const expectCached = (i: number): Expectation => { const serial = serials[i % serials.length]!; return { serial, status: statusOf(serial) }; };
    const none = (): Expectation => ({ serial: '', status: 'good' });

    // Warm-up (untimed): JIT on both sides, and one signature per serial into the responder's cache.
    await load(server.helloUrl, helloRequests, { concurrency: CONCURRENCY, seconds: 2, cycle: true, keep: false });
    const first = await load(ocspUrl, cachedRequests, { concurrency: Math.min(CONCURRENCY, 16), seconds: 120, cycle: false, keep: false });
    if (first.completed !== cachedRequests.length) throw new Error(`warm-up: ${first.completed}/${cachedRequests.length} answered; server log ${logFile}`);
    await load(ocspUrl, cachedRequests, { concurrency: CONCURRENCY, seconds: 2, cycle: true, keep: false });
    const warm = await server.stats();
    log(`warm-up: responder cache holds ${fmt(warm.cacheSize)} serials after ${fmt(warm.signatures)} signatures`);

    const out: Figure[] = [];
    const unit = 'responses/s';
    const describe = (w: Window): string =>
      `${fmt(w.completed)} answers in ${w.seconds.toFixed(1)} s, ${CONCURRENCY} keep-alive connections; errors ${w.errors}${w.errors ? ` (${w.errorSummary})` : ''}; ` +
      `signatures ${fmt(w.signatures)}; server CPU ${fmt(w.serverCpuUs)} µs/answer, client ${fmt(w.clientCpuUs)} µs/answer; other processes ${Math.round(w.othersLoad * 100)}% of the machine`;

    if (RUNS.includes('cached')) {
      const hellos: Window[] = [];
      const cached: Window[] = [];
      for (let r = 1; r <= ROUNDS; r++) {
        hellos.push(await window(`hello world, round ${r}`, server, server.helloUrl, helloRequests, true, none, issuerDer, 'hello'));
        cached.push(await window(`OCSP cached, round ${r}`, server, ocspUrl, cachedRequests, true, expectCached, issuerDer, 'ocsp'));
      }
      const best = (ws: Window[]): Window => ws.reduce((a, b) => (b.rate > a.rate ? b : a));
      const h = best(hellos);
      const c = best(cached);
      const ratio = c.rate / h.rate;
      out.push(figure(`OCSP cached (no nonce), ${fmt(CERTS)} serials`, c.rate, unit, h.rate,
        `${describe(c)}; ceiling = Fastify hello world, same server set-up and client load (best of ${ROUNDS} each, alternating: hello ${hellos.map((w) => fmt(w.rate)).join(' / ')}, OCSP ${cached.map((w) => fmt(w.rate)).join(' / ')}); ` +
        `target ≥ ${TARGET_CACHED_RATIO * 100} % of it ${ratio >= TARGET_CACHED_RATIO ? 'met' : 'MISSED'}; hello world: ${describe(h)}`));
    }
    if (RUNS.includes('uncached')) {
      const n = NONCE_REQUESTS_PER_SECOND * SECONDS;
      const nonces = Array.from({ length: n }, () => randomBytes(16));
      const nonceRequests = nonces.map((nonce, i) => post(ocspUrl, encodeOcspRequest([certIds[i % certIds.length]!], nonce)));
      const expectNonce = (i: number): Expectation => ({ ...expectCached(i), nonce: nonces[i]! });
      const u = await window('OCSP uncached (nonce)', server, ocspUrl, nonceRequests, false, expectNonce, issuerDer, 'ocsp');
      if (u.completed >= n) log(`uncached: all ${fmt(n)} prepared requests were used before ${SECONDS} s: the rate is over fewer seconds`);
      out.push(figure(`OCSP uncached (nonce, one signature each)`, u.rate, unit, ceiling,
        `${describe(u)}; ceiling = crypto.sign P-256 on one thread, synchronous (the server signs on the libuv pool)`));
    }
    const logBytes = statSync(logFile).size;
    const final = await server.stats();
    log(`server log: ${fmt(logBytes / Math.max(1, final.requests))} bytes per OCSP request (pino, info level, as \`hallmark serve\`); responder stats ${JSON.stringify({ ...final, type: undefined })}`);
    await server.stop();
    server = undefined;
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
