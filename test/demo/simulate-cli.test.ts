// `hallmark simulate` through the real CLI, against a real `hallmark serve --broker-dir` (another process)
// and the real Mosquitto with the configuration `hallmark broker mosquitto` wrote: 20 devices and a claim
// with 18 uses, so 2 enrolments are refused; while the fleet publishes, one device is revoked and another
// suspended with the CLI, and the broker (kept in step by serve) disconnects both. The printed summary
// must say so: enrolled 18/20, connected 18/20 (16 still connected), refused 2 with the reason, 2
// disconnected by the broker (administrative action), heartbeats. Outside CI a missing mosquitto skips.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Authority } from '../../src/authority/authority.js';
import { MOSQUITTO_BINARY, MosquittoProcess } from '../../src/broker/mosquitto-process.js';
import { createClaim } from '../../src/enrollment/claims.js';
import { freePort } from '../../src/net.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const skip = !existsSync(MOSQUITTO_BINARY) && process.env.CI !== 'true' ? 'mosquitto not installed (apt-get install mosquitto)' : false;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Run { code: number | null; stdout: string; stderr: string }

let t: TestAuthority;
let tmp: TempDir;
let broker: MosquittoProcess | undefined;
const children: ChildProcess[] = [];

function hallmark(args: string[], timeoutMs = 60_000): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args, '--home', t.home], { timeout: timeoutMs, encoding: 'utf8', env: { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' } }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : null) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

function background(args: string[], env: Record<string, string> = {}): { child: ChildProcess; out: () => string } {
  const child = spawn(process.execPath, [BIN, ...args], { env: { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '', HALLMARK_LOG_LEVEL: 'warn', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let out = '';
  child.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
  child.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
  return { child, out: () => out };
}

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, diag: () => string, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}\n${diag()}`);
    await sleep(50);
  }
}

before(async () => {
  if (skip) return;
  t = await createTestAuthority();
  tmp = await makeTempDir('hallmark-simulate-cli-');
});

after(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  await broker?.stop();
  await tmp?.cleanup();
  await t?.cleanup();
});

test('hallmark simulate --devices 20 against hallmark serve --broker-dir and Mosquitto: the summary', { skip, timeout: 180_000 }, async () => {
  assert.ok(existsSync(MOSQUITTO_BINARY), `${MOSQUITTO_BINARY} is required under CI=true`);
  // The registry: a product on the default policy, a batch taking unregistered keys, a claim with 18 uses.
  const authority = await Authority.open(t.home, t.passphrase);
  let claim: string;
  try {
    await authority.registry.createProduct({ name: 'sim-meter', actor: 'test' });
    await authority.registry.createLine({ name: 'sim-line', ca: 'issuing-1', actor: 'test' });
    const batch = await authority.registry.createBatch({ product: 'sim-meter', line: 'sim-line', quota: 100, allowUnregistered: true, actor: 'test' });
    claim = (await createClaim(authority.store, { batch, uses: 18, ttlMs: 3_600_000, perMinute: 1000, actor: 'test' })).basic;
  } finally {
    await authority.close();
  }

  const mqttPort = await freePort();
  const brokerDir = join(tmp.path, 'broker');
  const written = await hallmark(['broker', 'mosquitto', '--out', brokerDir, '--port', String(mqttPort)]);
  assert.equal(written.code, 0, written.stderr);
  assert.match(written.stdout, /admin listener .*admin\.sock/);
  broker = new MosquittoProcess(join(brokerDir, 'mosquitto.conf'), mqttPort);
  await broker.start();

  const [httpsPort, httpPort] = [await freePort(), await freePort()];
  const serve = background(['serve', '--home', t.home, '--port', String(httpsPort), '--http-port', String(httpPort), '--est-per-client', '0', '--broker-dir', brokerDir]);
  await waitFor('hallmark serve', async () => {
    try { return (await fetch(`http://127.0.0.1:${httpPort}/healthz`)).ok; } catch { return false; }
  }, serve.out);

  const sim = background(['simulate', '--devices', '20', '--server', `https://127.0.0.1:${httpsPort}`, '--broker', `mqtts://127.0.0.1:${mqttPort}`,
    '--trust', t.rootPem, '--claim', claim, '--heartbeat', '200ms', '--duration', '8s', '--concurrency', '8']);
  const diag = (): string => `--- simulate ---\n${sim.out()}\n--- serve ---\n${serve.out().slice(-3000)}\n--- broker ---\n${broker!.log.slice(-3000)}`;
  const exited = new Promise<number | null>((r) => sim.child.once('exit', (code) => r(code)));
  await waitFor('the fleet publishing', () => /publishing a heartbeat every/.test(sim.out()), diag, 90_000);

  // One device revoked, another suspended, with the CLI, while the fleet publishes.
  const list = await hallmark(['device', 'list', '--state', 'provisioned', '--json']);
  assert.equal(list.code, 0, list.stderr);
  const udids = (JSON.parse(list.stdout) as { items: { udid: string }[] }).items.map((d) => d.udid);
  assert.equal(udids.length, 18, list.stdout);
  const revoked = await hallmark(['revoke', '--device', udids[0]!, '--reason', 'keyCompromise']);
  assert.equal(revoked.code, 0, revoked.stderr);
  const suspended = await hallmark(['device', 'suspend', udids[1]!]);
  assert.equal(suspended.code, 0, suspended.stderr);

  const code = await exited;
  const out = sim.out();
  // Exit 1: not every device enrolled.
  assert.equal(code, 1, diag());
  const summary = out.slice(out.indexOf('summary:'));
  process.stderr.write(summary.trimEnd().split('\n').map((l) => `# ${l}\n`).join(''));
  assert.match(summary, /^ {2}enrolled {3}18\/20$/m, diag());
  assert.match(summary, /^ {2}connected {2}18\/20 \(16 still connected\)$/m, diag());
  assert.match(summary, /^ {2}refused {4}2$/m, diag());
  // The server words a used-up claim in one of two ways (depending on which check saw it first): both count.
  const claimRefusals = [...summary.matchAll(/^ {13}(\d+) × enrolment: CLAIM_INVALID .*claim/gm)].reduce((n, m) => n + Number(m[1]), 0);
  assert.equal(claimRefusals, 2, diag());
  assert.match(summary, /^ {2}disconnected by the broker 2$/m, diag());
  assert.match(summary, /^ {13}2 × DISCONNECT 0x98 administrative action$/m, diag());
  const heartbeats = Number(/^ {2}heartbeats (\d+)/m.exec(summary)?.[1]);
  assert.ok(heartbeats >= 18 * 10, `heartbeats ${heartbeats}\n${diag()}`);
  assert.match(summary, /latency {4}enrol p50 [\d.]+ ms, p99 [\d.]+ ms \(n=18\)/, diag());
  // Progress came first, then the summary.
  assert.match(out, /20 devices: enrolling at https:\/\/127\.0\.0\.1:\d+\n[\s\S]*connecting to mqtts:[\s\S]*summary:/);
  // The broker log shows the two sessions ended by the admin client.
  assert.equal((broker!.log.match(/been disconnected by administrative action/g) ?? []).length, 2, diag());

  serve.child.kill('SIGTERM');
  await waitFor('serve to stop', () => serve.child.exitCode !== null, serve.out, 10_000);
  assert.equal(serve.child.exitCode, 0, serve.out());
});
