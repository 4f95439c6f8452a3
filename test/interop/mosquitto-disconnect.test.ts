// The real Mosquitto (2.0.x) kept in step by keepMosquittoInStep (as `hallmark serve --broker-dir` does),
// with the registry changed by the real CLI in another process:
//   - `hallmark revoke --device`: the device's open MQTT session is ended by the broker within one second
//     (MQTT v5 DISCONNECT 0x98, through the dynamic security plugin's admin listener) and its
//     reconnection is refused at the TLS handshake (CRL), while another device's session stays up and its
//     messages keep reaching an independent subscriber (mosquitto_sub);
//   - `hallmark device suspend`: ended at once, and its next connection refused at the TLS handshake within
//     a second (its certificates are on hold in the CRL: certificateHold); `hallmark device resume`:
//     accepted again within a second; another device publishes every 50 ms throughout, undisturbed;
//   - `hallmark device decommission`: ended at once and refused at the handshake;
//   - `hallmark product policy`: a product allowed only telemetry/{udid} — its device's publish to
//     devices/<UDID>/x and to another device's topic is refused (MQTT v5: PUBACK "Not authorized"; MQTT
//     3.1.1: acknowledged and dropped) and never reaches a subscriber, its telemetry does.
// Outside CI a missing mosquitto skips with the reason; under CI=true it fails.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { MqttClient } from 'mqtt';
import { Authority } from '../../src/authority/authority.js';
import { keepMosquittoInStep, writeMosquittoConfig, type MosquittoConfig, type SyncResult } from '../../src/broker/mosquitto.js';
import { MOSQUITTO_BINARY, MosquittoProcess } from '../../src/broker/mosquitto-process.js';
import { connectOnce, disconnectReason } from '../../src/demo/simulator.js';
import { freePort } from '../../src/net.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const haveClients = spawnSync('mosquitto_pub', ['--help']).error === undefined && spawnSync('mosquitto_sub', ['--help']).error === undefined;
const haveMosquitto = existsSync(MOSQUITTO_BINARY) && haveClients;
const skip = !haveMosquitto && process.env.CI !== 'true' ? 'mosquitto not installed (apt-get install mosquitto mosquitto-clients)' : false;
const ACTOR = 'test';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Run { code: number | null; stdout: string; stderr: string; ms: number }

function run(cmd: string, args: string[], env: Record<string, string> = {}, timeoutMs = 30_000): Promise<Run> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, encoding: 'utf8', env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : null) : 0;
      resolve({ code, stdout, stderr, ms: performance.now() - t0 });
    });
  });
}

interface Device { name: string; udid: string; key: KeyObject; certPem: string; certFile: string; keyFile: string; serial: string }

/** A device client (the mqtt package) that records how its session ended. */
interface Session { client: MqttClient; closedAt?: number; reason?: string }

describe('Mosquitto: revoked, suspended and decommissioned devices disconnected at once; per-product policy', { skip }, () => {
  let t: TestAuthority;
  let authority: Authority;
  let tmp: TempDir;
  let config: MosquittoConfig;
  let port: number;
  let broker: MosquittoProcess;
  let rootPem: string;
  let stopSync: (() => void) | undefined;
  const syncErrors: string[] = [];
  const syncs: SyncResult[] = [];
  const devices = new Map<string, Device>();
  const sessions: Session[] = [];
  const children: ChildProcess[] = [];
  const dev = (name: string): Device => devices.get(name)!;
  const env = (): Record<string, string> => ({ HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' });
  const hallmark = (...args: string[]): Promise<Run> => run(process.execPath, [BIN, ...args, '--home', t.home], env());
  const tls = (d: Device): string[] => ['--cafile', config.files.ca, '--cert', d.certFile, '--key', d.keyFile, '-h', '127.0.0.1', '-p', String(port)];
  const pub = (d: Device, topic: string, message: string, version = 'mqttv5'): Promise<Run> =>
    run('mosquitto_pub', [...tls(d), '-V', version, '-q', '1', '-t', topic, '-m', message]);
  const diag = (): string => `--- broker log ---\n${broker.log.slice(-5000)}\n--- sync errors ---\n${syncErrors.join('\n')}`;

  async function newDevice(name: string, batch: string): Promise<Device> {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const spki = publicKey.export({ type: 'spki', format: 'der' });
    await authority.registry.registerDevices(batch, [{ publicKeySpki: spki }], ACTOR);
    const udid = createHash('sha256').update(spki).digest('hex');
    const cert = await authority.issueForDevice({ udid, csr: createCsr({ subject: encodeNameString('CN=ignored'), privateKey }), actor: ACTOR });
    const certPem = encodePem('CERTIFICATE', cert.der) + encodePem('CERTIFICATE', cert.chain[0]!);
    const certFile = join(tmp.path, `${name}.pem`);
    const keyFile = join(tmp.path, `${name}.key`);
    await writeFile(certFile, certPem);
    await writeFile(keyFile, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });
    const d = { name, udid, key: privateKey, certPem, certFile, keyFile, serial: cert.serial };
    devices.set(name, d);
    return d;
  }

  async function session(d: Device): Promise<Session> {
    const { outcome, client } = await connectOnce({ broker: `mqtts://127.0.0.1:${port}`, trust: rootPem, certPem: d.certPem, key: d.key, clientId: `${d.name}-${sessions.length}`, timeoutMs: 10_000 });
    assert.ok(client, `${d.name} could not connect: ${JSON.stringify(outcome)}\n${diag()}`);
    const s: Session = { client };
    let reasonCode: number | undefined;
    client.on('disconnect', (packet) => { reasonCode = packet.reasonCode ?? 0; });
    client.on('close', () => { if (s.closedAt === undefined) { s.closedAt = performance.now(); s.reason = disconnectReason(reasonCode); } });
    client.on('error', () => {});
    sessions.push(s);
    return s;
  }

  const publish = (s: Session, topic: string, message: string): Promise<string> =>
    new Promise((resolve) => s.client.publish(topic, message, { qos: 1 }, (err) => resolve(err ? `${(err as { code?: unknown }).code ?? ''} ${err.message}` : 'OK')));

  /** An independent subscriber (mosquitto_sub with device d's identity) once its SUBACK arrived. */
  async function subscriber(d: Device, topics: string[]): Promise<{ lines: () => string[]; out: () => string; stop: () => void }> {
    const child = spawn('stdbuf', ['-oL', 'mosquitto_sub', ...tls(d), '-V', 'mqttv5', '-q', '1', '-d', '-v', ...topics.flatMap((x) => ['-t', x])], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let out = '';
    child.stdout!.on('data', (b: Buffer) => { out += b.toString(); });
    child.stderr!.on('data', (b: Buffer) => { out += b.toString(); });
    const deadline = Date.now() + 10_000;
    while (!/SUBACK/.test(out)) {
      assert.ok(Date.now() < deadline && child.exitCode === null, `mosquitto_sub did not subscribe: ${out}\n${diag()}`);
      await sleep(20);
    }
    const prefixes = topics.map((x) => x.replace(/#$/, ''));
    return {
      lines: () => out.split('\n').filter((l) => prefixes.some((p) => l.startsWith(p))),
      out: () => out,
      stop: () => { if (child.exitCode === null) child.kill('SIGTERM'); },
    };
  }

  async function waitFor(what: string, cond: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!(await cond())) {
      if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}\n${diag()}`);
      await sleep(10);
    }
  }

  before(async () => {
    assert.ok(haveMosquitto, `${MOSQUITTO_BINARY}, mosquitto_pub and mosquitto_sub are required under CI=true (apt-get install mosquitto mosquitto-clients)`);
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    rootPem = await readFile(t.rootPem, 'utf8');
    tmp = await makeTempDir('hallmark-mq-kick-');
    await authority.registry.createProduct({ name: 'meter', actor: ACTOR });
    await authority.registry.createProduct({ name: 'gauge', actor: ACTOR });
    await authority.registry.createLine({ name: 'line-1', ca: 'issuing-1', actor: ACTOR });
    const meters = await authority.registry.createBatch({ product: 'meter', line: 'line-1', quota: 10, actor: ACTOR });
    const gauges = await authority.registry.createBatch({ product: 'gauge', line: 'line-1', quota: 10, actor: ACTOR });
    for (const name of ['A', 'B', 'C', 'D']) await newDevice(name, meters);
    await newDevice('G', gauges);

    port = await freePort();
    config = await writeMosquittoConfig(authority, { dir: join(tmp.path, 'broker'), port, actor: ACTOR });
    assert.ok(config.admin, 'the dynamic security plugin is installed with mosquitto 2.0 (Debian: in the mosquitto package)');
    broker = new MosquittoProcess(config.files.config, port);
    await broker.start();
    stopSync = keepMosquittoInStep(authority, config.dir, { onError: (e) => syncErrors.push((e as Error).message), onSync: (r) => syncs.push(r) });
  });

  after(async () => {
    stopSync?.();
    for (const s of sessions) s.client.end(true);
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    await broker?.stop();
    await authority?.close();
    await tmp?.cleanup();
    await t?.cleanup();
  });

  test('the configuration: an admin listener on a Unix socket with the dynamic security plugin, its password 0600', async () => {
    const conf = await readFile(config.files.config, 'utf8');
    assert.ok(conf.split('\n').includes('per_listener_settings true'));
    assert.ok(conf.split('\n').includes(`listener 0 ${config.files.socket}`), conf);
    assert.match(conf, /^plugin \S+mosquitto_dynamic_security\.so$/m);
    assert.equal(statSync(config.files.admin).mode & 0o777, 0o600);
    assert.equal(statSync(config.files.dynsec).mode & 0o777, 0o600);
    const admin = JSON.parse(await readFile(config.files.admin, 'utf8')) as { username: string; password: string; socket: string };
    assert.equal(admin.socket, config.files.socket);
    assert.ok(admin.password.length >= 24);
    assert.ok(!(await readFile(config.files.dynsec, 'utf8')).includes(admin.password), 'dynsec.json holds a hash, not the password');
    assert.ok(!broker.log.includes(admin.password), 'the password is never logged');
    // A device cannot reach the plugin: $CONTROL is not on the device listener.
    const r = await pub(dev('B'), '$CONTROL/dynamic-security/v1', '{"commands":[{"command":"listClients"}]}');
    assert.match(`${r.stdout}${r.stderr}`, /not authori[sz]ed/i, JSON.stringify(r));
  });

  test('hallmark revoke --device (another process): the session ends within 1 s, the reconnection is refused; another device keeps working', async () => {
    const a = dev('A');
    const b = dev('B');
    const sa = await session(a);
    const sb = await session(b);
    const watcher = await subscriber(b, [`devices/${b.udid}/commands/#`]);
    assert.equal(await publish(sb, `devices/${b.udid}/commands/x`, 'before'), 'OK');
    await waitFor('the subscriber to see "before"', () => watcher.lines().includes(`devices/${b.udid}/commands/x before`));

    const spawned = performance.now();
    const r = await hallmark('revoke', '--device', a.udid, '--reason', 'keyCompromise');
    const exited = performance.now();
    assert.equal(r.code, 0, r.stderr);
    await waitFor('the revoked device\'s session to end', () => sa.closedAt !== undefined, 5000);
    const afterExit = sa.closedAt! - exited;
    const afterSpawn = sa.closedAt! - spawned;
    process.stderr.write(`# revoke: session ended ${afterExit.toFixed(0)} ms after "hallmark revoke" exited (${afterSpawn.toFixed(0)} ms after it was started)\n`);
    assert.ok(afterExit < 1000, `ended ${afterExit} ms after hallmark revoke\n${diag()}`);
    assert.equal(sa.reason, 'DISCONNECT 0x98 administrative action');

    const again = await connectOnce({ broker: `mqtts://127.0.0.1:${port}`, trust: rootPem, certPem: a.certPem, key: a.key, clientId: 'A-again', timeoutMs: 10_000 });
    again.client?.end(true);
    assert.equal(again.outcome.ok, false, 'the revoked device is refused');
    assert.match(`${again.outcome.code} ${again.outcome.error}`, /certificate revoked/i);

    // B: never disconnected; its messages still reach the independent subscriber.
    assert.equal(sb.closedAt, undefined, 'the other device kept its session');
    assert.equal(await publish(sb, `devices/${b.udid}/commands/x`, 'after'), 'OK');
    assert.equal((await pub(b, `devices/${b.udid}/commands/y`, 'after-pub')).code, 0);
    await waitFor('the subscriber to see B\'s messages after the revocation', () =>
      watcher.lines().includes(`devices/${b.udid}/commands/x after`) && watcher.lines().includes(`devices/${b.udid}/commands/y after-pub`));
    assert.ok(syncs.some((s) => s.kick?.kicked.includes(a.udid)), JSON.stringify(syncs));
    watcher.stop();
  });

  test('hallmark device suspend: ended at once and refused at the handshake (certificateHold); hallmark device resume: accepted again; another device keeps publishing', async () => {
    const c = dev('C');
    const b = dev('B');
    const sc = await session(c);
    assert.equal(await publish(sc, `devices/${c.udid}/telemetry`, 'before'), 'OK');
    // B publishes every 50 ms throughout; an independent subscriber must get every one of its messages.
    const sb = await session(b);
    const bWatch = await subscriber(b, [`devices/${b.udid}/commands/#`]);
    let sent = 0;
    const failures: string[] = [];
    const ticker = setInterval(() => {
      const n = ++sent;
      void publish(sb, `devices/${b.udid}/commands/tick`, String(n)).then((r) => { if (r !== 'OK') failures.push(`${n}: ${r}`); });
    }, 50);
    const attempt = async (): Promise<Awaited<ReturnType<typeof connectOnce>>> => {
      const r = await connectOnce({ broker: `mqtts://127.0.0.1:${port}`, trust: rootPem, certPem: c.certPem, key: c.key, clientId: `C-${performance.now().toFixed(0)}`, timeoutMs: 10_000 });
      return r;
    };
    try {
      const r = await hallmark('device', 'suspend', c.udid);
      const exited = performance.now();
      assert.equal(r.code, 0, r.stderr);
      await waitFor('the suspended device\'s session to end', () => sc.closedAt !== undefined, 5000);
      assert.ok(sc.closedAt! - exited < 1000, `ended ${sc.closedAt! - exited} ms after hallmark device suspend`);
      assert.equal(sc.reason, 'DISCONNECT 0x98 administrative action');

      // Its certificates are on hold in the CRL (certificateHold): its next connection is refused at the TLS handshake.
      let refused: Awaited<ReturnType<typeof connectOnce>> | undefined;
      while (!refused) {
        const a = await attempt();
        if (a.outcome.ok) { a.client?.end(true); assert.ok(performance.now() - exited < 5000, `still accepted 5 s after hallmark device suspend\n${diag()}`); await sleep(10); continue; }
        refused = a;
      }
      const refusedAfter = performance.now() - exited;
      process.stderr.write(`# suspend: new connection refused ${refusedAfter.toFixed(0)} ms after "hallmark device suspend" exited\n`);
      assert.ok(refusedAfter < 1000, `refused ${refusedAfter} ms after hallmark device suspend`);
      assert.match(`${refused.outcome.code} ${refused.outcome.error}`, /certificate revoked/i);
      const p = await pub(c, `devices/${c.udid}/telemetry`, 'while suspended');
      assert.notEqual(p.code, 0, 'mosquitto_pub is refused too');
      // The connection decision says why.
      const check = await run(process.execPath, [BIN, 'connect', 'check', '--cert', c.certFile, '--home', t.home], env());
      assert.equal(check.code, 1);
      assert.match(check.stdout, /REFUSED DEVICE_SUSPENDED/);

      const resumed = await hallmark('device', 'resume', c.udid);
      assert.equal(resumed.code, 0, resumed.stderr);
      const resumedAt = performance.now();
      let s2: MqttClient | undefined;
      while (!s2) {
        const a = await attempt();
        if (a.outcome.ok) { s2 = a.client; break; }
        a.client?.end(true);
        assert.ok(performance.now() - resumedAt < 5000, `still refused 5 s after hallmark device resume: ${JSON.stringify(a.outcome)}\n${diag()}`);
        await sleep(10);
      }
      const acceptedAfter = performance.now() - resumedAt;
      process.stderr.write(`# resume: connection accepted ${acceptedAfter.toFixed(0)} ms after "hallmark device resume" exited\n`);
      assert.ok(acceptedAfter < 1000, `accepted ${acceptedAfter} ms after hallmark device resume`);
      s2!.on('error', () => {});
      await waitFor('publishing again after the resumption', async () =>
        (await new Promise<string>((res) => s2!.publish(`devices/${c.udid}/telemetry`, 'resumed', { qos: 1 }, (err) => res(err ? err.message : 'OK')))) === 'OK', 3000);
      s2!.end(true);
      const watcher = await subscriber(c, [`devices/${c.udid}/commands/#`]);
      assert.equal((await pub(c, `devices/${c.udid}/commands/hello`, 'back')).code, 0);
      await waitFor('the resumed device\'s message at its subscriber', () => watcher.lines().includes(`devices/${c.udid}/commands/hello back`));
      watcher.stop();
    } finally {
      clearInterval(ticker);
    }
    // B: never disconnected, every message acknowledged and delivered.
    const total = sent;
    await waitFor('all of B\'s messages at the subscriber', () => new Set(bWatch.lines().filter((l) => l.startsWith(`devices/${b.udid}/commands/tick `))).size === total, 5000);
    assert.deepEqual(failures, []);
    assert.equal(sb.closedAt, undefined, 'the other device kept its session');
    assert.ok(total > 10, `B published ${total} messages meanwhile`);
    bWatch.stop();
  });

  test('hallmark device decommission: ended at once and refused at the handshake', async () => {
    const d = dev('D');
    const sd = await session(d);
    const r = await hallmark('device', 'decommission', d.udid);
    const exited = performance.now();
    assert.equal(r.code, 0, r.stderr);
    await waitFor('the decommissioned device\'s session to end', () => sd.closedAt !== undefined, 5000);
    assert.ok(sd.closedAt! - exited < 1000, `ended ${sd.closedAt! - exited} ms after hallmark device decommission`);
    const again = await connectOnce({ broker: `mqtts://127.0.0.1:${port}`, trust: rootPem, certPem: d.certPem, key: d.key, clientId: 'D-again', timeoutMs: 10_000 });
    again.client?.end(true);
    assert.equal(again.outcome.ok, false);
    assert.match(`${again.outcome.code} ${again.outcome.error}`, /certificate revoked/i);
  });

  test('a product policy reaches the broker: a gauge may publish only telemetry/{udid}', async () => {
    const g = dev('G');
    const b = dev('B');
    const policyFile = join(tmp.path, 'gauge-policy.json');
    await writeFile(policyFile, JSON.stringify({ mqtt: { publish: ['telemetry/{udid}'], subscribe: ['telemetry/{udid}', 'devices/{udid}/#'] } }));
    const set = await hallmark('product', 'policy', 'gauge', '--file', policyFile);
    assert.equal(set.code, 0, set.stderr);
    assert.match(set.stdout, /publish:\n {4}telemetry\/\{udid\}/);
    await waitFor('the per-device ACL', async () => (await readFile(config.files.acl, 'utf8')).includes(`user ${g.udid}\ntopic write telemetry/${g.udid}\n`), 3000);
    const acl = await readFile(config.files.acl, 'utf8');
    assert.match(acl, /^# Layout: per-device/m);
    assert.ok(acl.includes(`user ${b.udid}\ntopic write devices/${b.udid}/#\ntopic read devices/${b.udid}/commands/#\n`), acl);
    assert.ok(acl.includes(`user ${dev('C').udid}\n`), 'the resumed device is named');
    assert.ok(!acl.includes(dev('A').udid), 'the revoked device is not named');
    assert.doesNotMatch(acl, /^pattern /m);

    const gWatch = await subscriber(g, [`telemetry/${g.udid}`, `devices/${g.udid}/#`]);
    const bWatch = await subscriber(b, [`devices/${b.udid}/commands/#`]);
    // Outside its policy: refused. MQTT v5 says so; MQTT 3.1.1 has no reason code: acknowledged, dropped.
    const v5 = await pub(g, `devices/${g.udid}/x`, 'forbidden-v5');
    assert.match(`${v5.stdout}${v5.stderr}`, /not authori[sz]ed/i, JSON.stringify(v5));
    const v311 = await pub(g, `devices/${g.udid}/x`, 'forbidden-v311', 'mqttv311');
    assert.equal(v311.code, 0, `MQTT 3.1.1: the broker acknowledges and drops: ${JSON.stringify(v311)}`);
    const other = await pub(g, `devices/${b.udid}/commands/x`, 'forbidden-other');
    assert.match(`${other.stdout}${other.stderr}`, /not authori[sz]ed/i);
    // Inside: delivered.
    assert.equal((await pub(g, `telemetry/${g.udid}`, 'allowed')).code, 0);
    assert.equal((await pub(b, `devices/${b.udid}/commands/y`, 'b-allowed')).code, 0);
    await waitFor('the allowed messages', () => gWatch.lines().includes(`telemetry/${g.udid} allowed`) && bWatch.lines().includes(`devices/${b.udid}/commands/y b-allowed`));
    await sleep(200);
    assert.deepEqual(gWatch.lines(), [`telemetry/${g.udid} allowed`], gWatch.out());
    assert.deepEqual(bWatch.lines(), [`devices/${b.udid}/commands/y b-allowed`], bWatch.out());

    // The connection decision agrees.
    const check = await run(process.execPath, [BIN, 'connect', 'check', '--cert', g.certFile, '--home', t.home], env());
    assert.equal(check.code, 0, check.stderr);
    assert.match(check.stdout, new RegExp(`publish:\\n {4}telemetry/${g.udid}\\n`));

    // Back to the default: one set of patterns again, and the gauge may use devices/<UDID>/.
    assert.equal((await hallmark('product', 'policy', 'gauge', '--default')).code, 0);
    await waitFor('the uniform ACL', async () => /^pattern write devices\/%u\/#$/m.test(await readFile(config.files.acl, 'utf8')), 3000);
    await waitFor('the gauge publishing under devices/', async () => {
      const r = await pub(g, `devices/${g.udid}/x`, 'now-allowed');
      return r.code === 0 && `${r.stdout}${r.stderr}` === '';
    }, 3000);
    gWatch.stop();
    bWatch.stop();
    assert.deepEqual(syncErrors, []);
  });

  test('hallmark product policy refuses bad policies with a reason and changes nothing', async () => {
    const bad = join(tmp.path, 'bad-policy.json');
    for (const [text, why] of [
      ['{"mqtt": {"publish": ["a/#/b"]}}', /'#' must be a whole level/],
      ['{"mqtt": {"publish": ["telemetry/{device}"]}}', /unknown placeholder \{device\}/],
      ['{"mqtt": {"publish": ["x\\ntopic readwrite everything"]}}', /control character/],
      ['{"mqtt": {"publish": [" padded"]}}', /white space/],
      ['not json', /not JSON/],
      ['{"http": {}}', /unknown policy field/],
    ] as const) {
      await writeFile(bad, text);
      const r = await hallmark('product', 'policy', 'gauge', '--file', bad);
      assert.equal(r.code, 1, `${text}: ${r.stdout}${r.stderr}`);
      assert.match(r.stderr, why);
      assert.match(r.stderr, /\[BAD_REQUEST\]/);
      assert.equal(r.stderr.trim().split('\n').length, 1);
    }
    const shown = await hallmark('product', 'policy', 'gauge', '--json');
    assert.equal(shown.code, 0);
    assert.equal((JSON.parse(shown.stdout) as { default: boolean }).default, true, 'still the default policy');
    const missing = await hallmark('product', 'policy', 'no-such-product');
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /\[PRODUCT_NOT_FOUND\]/);
  });
});
