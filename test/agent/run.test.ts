// The agent's run loop (src/agent/run.ts) against a real Hallmark server in this process and the real
// Mosquitto (2.0.x) configured by writeMosquittoConfig: the agent enrols with a claim, renews at once
// (threshold 0 %) and reconnects with the new certificate, publishes heartbeats that the broker receives
// (the agent's 'heartbeat' events are QoS 1 PUBACKs; the broker's own debug log shows each PUBLISH),
// reconnects after the broker restarts, and after its certificate is revoked and crl.pem refreshed its
// reconnection is refused. A broker whose certificate comes from another CA is refused by the agent
// (it never connects). Outside CI a missing mosquitto skips with the reason; under CI=true it fails.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { appendFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { EnrolmentInfo } from '../../src/agent/agent.js';
import { openDeviceKey, type DeviceKey } from '../../src/agent/device-key.js';
import { runAgent, type ConnectedEvent, type HeartbeatEvent, type RefusedEvent, type RunningAgent } from '../../src/agent/run.js';
import { Authority } from '../../src/authority/authority.js';
import { refreshMosquittoCrl, writeMosquittoConfig, type MosquittoConfig } from '../../src/broker/mosquitto.js';
import { createClaim } from '../../src/enrollment/claims.js';
import { createLogger } from '../../src/log.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { freePort } from '../../src/net.js';

const MOSQUITTO = '/usr/sbin/mosquitto';
const haveMosquitto = existsSync(MOSQUITTO);
const skip = !haveMosquitto && process.env.CI !== 'true' ? 'mosquitto not installed (apt-get install mosquitto)' : false;
const ACTOR = 'test';
const DAY = 86400e3;
const REPO = resolve(fileURLToPath(import.meta.url), '../../../..');

class Broker {
  child: ChildProcess | undefined;
  log = '';
  constructor(readonly config: MosquittoConfig, readonly port: number) {}

  async start(): Promise<void> {
    const child = spawn(MOSQUITTO, ['-c', this.config.files.config], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    child.stdout!.on('data', (d: Buffer) => { this.log += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { this.log += d.toString(); });
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`mosquitto exited (${child.exitCode}):\n${this.log}`);
      const ok = await new Promise<boolean>((resolve) => {
        const sock = connect(this.port, '127.0.0.1', () => { sock.destroy(); resolve(true); });
        sock.once('error', () => resolve(false));
      });
      if (ok) return;
      if (Date.now() > deadline) throw new Error(`mosquitto did not listen on ${this.port}:\n${this.log}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async stop(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
    if (child.exitCode === null && child.signalCode === null) { child.kill('SIGKILL'); await exited; }
  }
}

/** Records an agent's events. */
class Recorder {
  enrolled: EnrolmentInfo[] = [];
  connected: ConnectedEvent[] = [];
  heartbeats: HeartbeatEvent[] = [];
  renewed: EnrolmentInfo[] = [];
  refused: RefusedEvent[] = [];
  errors: Error[] = [];
  constructor(readonly agent: RunningAgent) {
    const e = agent.events;
    e.on('enrolled', (i: EnrolmentInfo) => this.enrolled.push(i));
    e.on('connected', (c: ConnectedEvent) => this.connected.push(c));
    e.on('heartbeat', (h: HeartbeatEvent) => this.heartbeats.push(h));
    e.on('renewed', (i: EnrolmentInfo) => this.renewed.push(i));
    e.on('refused', (r: RefusedEvent) => this.refused.push(r));
    e.on('error', (err: Error) => this.errors.push(err));
  }
  summary(): string {
    return JSON.stringify({ enrolled: this.enrolled.length, connected: this.connected, heartbeats: this.heartbeats.length, renewed: this.renewed.length, refused: this.refused, errors: this.errors.map((e) => `${(e as { code?: unknown }).code}: ${e.message}`) }, null, 1);
  }
}

async function waitFor(what: string, cond: () => boolean, diag: () => string, ms = 20_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}\n${diag()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('agent run loop: EST + MQTT over TLS against the real Mosquitto', { skip }, () => {
  let t: TestAuthority;
  let other: TestAuthority;
  let authority: Authority;
  let otherAuthority: Authority;
  let servers: RunningServers;
  let tmp: TempDir;
  let rootPem: string;
  let batch: string;
  let broker: Broker;
  let foreignBroker: Broker;
  const agents: RunningAgent[] = [];
  const keys: DeviceKey[] = [];

  const newKey = async (name: string): Promise<DeviceKey> => {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const path = join(tmp.path, `${name}.key`);
    writeFileSync(path, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    const key = await openDeviceKey(path);
    keys.push(key);
    return key;
  };
  const claim = async (): Promise<string> => (await createClaim(authority.store, { batch, uses: 1, ttlMs: DAY, actor: ACTOR })).basic;

  before(async () => {
    assert.ok(haveMosquitto, `${MOSQUITTO} is required under CI=true (apt-get install mosquitto)`);
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    const sink = { write: () => true } as unknown as NodeJS.WritableStream;
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(sink) });
    tmp = await makeTempDir('hallmark-agent-run-');
    rootPem = readFileSync(t.rootPem, 'utf8');
    await authority.registry.createProduct({ name: 'meter', actor: ACTOR });
    await authority.registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: ACTOR });
    batch = await authority.registry.createBatch({ product: 'meter', line: 'line-a', quota: 10, allowUnregistered: true, actor: ACTOR });

    const port = await freePort();
    const config = await writeMosquittoConfig(authority, { dir: join(tmp.path, 'broker'), port, actor: ACTOR });
    // This test's own copy of the configuration: log every packet, so the broker shows each PUBLISH it received.
    await appendFile(config.files.config, 'log_type all\n');
    broker = new Broker(config, port);
    await broker.start();

    // A broker with a certificate from another Hallmark (another root).
    other = await createTestAuthority({ org: 'Other Org' });
    otherAuthority = await Authority.open(other.home, other.passphrase);
    const otherPort = await freePort();
    foreignBroker = new Broker(await writeMosquittoConfig(otherAuthority, { dir: join(tmp.path, 'foreign-broker'), port: otherPort, actor: ACTOR }), otherPort);
    await foreignBroker.start();
  });

  after(async () => {
    for (const a of agents) await a.stop().catch(() => {});
    for (const k of keys) await k.close().catch(() => {});
    await broker?.stop();
    await foreignBroker?.stop();
    await servers?.close();
    await authority?.close();
    await otherAuthority?.close();
    await tmp?.cleanup();
    await t?.cleanup();
    await other?.cleanup();
  });

  test('enrols with a claim, renews and reconnects, heartbeats reach the broker, reconnects after a drop, refused once revoked', async () => {
    const key = await newKey('device');
    const stateDir = join(tmp.path, 'state');
    const agent = runAgent({
      server: servers.httpsUrl, trust: rootPem, key, stateDir, claim: await claim(),
      broker: `mqtts://127.0.0.1:${broker.port}`,
      heartbeatMs: 200, renewAfterPercent: 0, renewMinIntervalMs: 600_000, backoffMinMs: 100, backoffMaxMs: 500,
    });
    agents.push(agent);
    const r = new Recorder(agent);
    const diag = (): string => `${r.summary()}\n--- broker log ---\n${broker.log.slice(-4000)}`;

    await waitFor('enrolment', () => r.enrolled.length === 1, diag);
    const first = r.enrolled[0]!;
    assert.equal(first.authenticator, 'claim');
    assert.equal(first.udid, key.udid);
    assert.ok(existsSync(join(stateDir, 'cert.pem')));

    // Threshold 0 %: due at once (the product has no window of its own), renewed, and reconnected with it.
    await waitFor('renewal', () => r.renewed.length === 1, diag);
    const renewed = r.renewed[0]!;
    assert.notEqual(renewed.serial, first.serial);
    assert.equal(renewed.authenticator, 'current-certificate');
    await waitFor('a connection with the renewed certificate', () => r.connected.some((c) => c.serial === renewed.serial), diag);
    await waitFor('heartbeats with the renewed certificate', () => r.heartbeats.filter((h) => h.serial === renewed.serial).length >= 3, diag);
    const hb = r.heartbeats.at(-1)!;
    assert.equal(hb.udid, key.udid);
    assert.equal(hb.topic, `devices/${key.udid}/heartbeat`);
    assert.ok(Math.abs(Date.parse(hb.at) - Date.now()) < 10_000);
    // The broker received them: its log names the client (the UDID, also the username) and the topic.
    await waitFor('PUBLISH in the broker log', () => broker.log.includes(`Received PUBLISH from ${key.udid}`) && broker.log.includes(`'devices/${key.udid}/heartbeat'`), diag);
    assert.match(broker.log, new RegExp(`New client connected from 127\\.0\\.0\\.1:\\d+ as ${key.udid} .*u'${key.udid}'`));
    assert.equal(r.refused.length, 0, diag());
    assert.equal(r.errors.length, 0, diag());

    // The broker goes away and comes back: the agent reconnects with backoff and carries on.
    const connectionsBefore = r.connected.length;
    await broker.stop();
    await new Promise((res) => setTimeout(res, 400));
    await broker.start();
    await waitFor('reconnection after the broker restarted', () => r.connected.length > connectionsBefore, diag);
    const beats = r.heartbeats.length;
    await waitFor('heartbeats after the reconnection', () => r.heartbeats.length >= beats + 2, diag);

    // Revoked, crl.pem refreshed: the open session stays (a CRL is checked at the handshake), the next is refused.
    await authority.revoke({ device: key.udid }, 'keyCompromise', ACTOR);
    await refreshMosquittoCrl(authority, broker.config.dir);
    const connectedBeforeRevocation = r.connected.length;
    await broker.stop();
    await broker.start();
    await waitFor('the broker refusing the revoked certificate', () => r.refused.length >= 2, diag);
    assert.ok(r.refused.every((x) => x.by === 'broker'), diag());
    assert.match(r.refused[0]!.reason, /revoked/i, diag());
    assert.equal(r.connected.length, connectedBeforeRevocation, 'never connected again');

    await agent.stop();
    const after = r.heartbeats.length;
    await new Promise((res) => setTimeout(res, 400));
    assert.equal(r.heartbeats.length, after, 'nothing after stop()');
  });

  test('the CLI: hallmark agent run --json enrols, connects, heartbeats, and stops cleanly on SIGTERM', async () => {
    const keyPath = join(tmp.path, 'cli-device.key');
    writeFileSync(keyPath, generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    const child = spawn(process.execPath, [join(REPO, 'bin/hallmark.js'), 'agent', 'run', '--server', servers.httpsUrl, '--broker', `mqtts://127.0.0.1:${broker.port}`,
      '--trust', t.rootPem, '--key', keyPath, '--out', join(tmp.path, 'state-cli'), '--heartbeat', '200ms', '--json'],
    { cwd: REPO, env: { ...process.env, HALLMARK_CLAIM: await claim() }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    const exited = new Promise<number | null>((res) => child.once('exit', (code) => res(code)));
    try {
      const events = (): Array<Record<string, unknown>> => stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
      await waitFor('two heartbeats from the CLI', () => events().filter((e) => e.event === 'heartbeat').length >= 2, () => `${stdout}\n${stderr}`);
      const kinds = events().map((e) => e.event);
      assert.deepEqual(kinds.slice(0, 2), ['enrolled', 'connected'], stdout);
      child.kill('SIGTERM');
      assert.equal(await exited, 0, stderr);
      assert.match(stderr, /SIGTERM, stopping/);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });

  test('a broker whose certificate comes from another CA is refused: the agent never connects', async () => {
    const key = await newKey('device-foreign');
    const stateDir = join(tmp.path, 'state-foreign');
    const agent = runAgent({
      server: servers.httpsUrl, trust: rootPem, key, stateDir, claim: await claim(),
      broker: `mqtts://127.0.0.1:${foreignBroker.port}`, heartbeatMs: 200, backoffMinMs: 100, backoffMaxMs: 300,
    });
    agents.push(agent);
    const r = new Recorder(agent);
    const diag = (): string => `${r.summary()}\n--- foreign broker log ---\n${foreignBroker.log.slice(-3000)}`;
    await waitFor('enrolment', () => r.enrolled.length === 1, diag);
    await waitFor('two refusals', () => r.refused.length >= 2, diag);
    for (const x of r.refused) {
      assert.equal(x.by, 'agent', diag());
      assert.match(x.reason, /not trusted/);
    }
    assert.equal(r.connected.length, 0, diag());
    assert.equal(r.heartbeats.length, 0, diag());
    await agent.stop();
    // The foreign broker never saw an MQTT CONNECT from the device.
    assert.ok(!foreignBroker.log.includes(key.udid), diag());
  });
});
