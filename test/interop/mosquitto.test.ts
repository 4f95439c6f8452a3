// The real Mosquitto (2.0.x) with the configuration `writeMosquittoConfig` makes: device certificates
// issued by Hallmark connect with mosquitto_pub / mosquitto_sub; the MQTT username is the UDID, so the
// default ACL lets a device publish under devices/<UDID>/ and read devices/<UDID>/commands/.
//
// How delivery is verified: device A subscribes to its own devices/A/commands/# (the only thing it may
// read) and then publishes "ping" there itself (it may write devices/A/#). Device B publishes "evil" to
// devices/A/commands/… (refused: MQTT v5 PUBACK "Not authorized"), then A publishes "after". The
// subscriber, taking exactly two messages, must see "ping" and "after" and never "evil".
// A certificate from an unknown CA (even with A's UDID as CN) fails the TLS handshake. A revoked device
// still connects while crl.pem is stale, and is refused after refreshMosquittoCrl (SIGHUP: Mosquitto
// reloads the CRL), and after keepMosquittoInStep reacts to a revocation, while A keeps publishing.
// Outside CI a missing mosquitto skips with the reason; under CI=true it fails.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, generateKeyPairSync, X509Certificate } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { Authority, type IssuedCertificate } from '../../src/authority/authority.js';
import { keepMosquittoInStep, refreshMosquittoCrl, syncMosquitto, writeMosquittoConfig, type MosquittoConfig } from '../../src/broker/mosquitto.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { freePort } from '../../src/net.js';

const MOSQUITTO = '/usr/sbin/mosquitto';
const haveMosquitto = existsSync(MOSQUITTO) && spawnSync('mosquitto_pub', ['--help']).error === undefined && spawnSync('mosquitto_sub', ['--help']).error === undefined;
const skip = !haveMosquitto && process.env.CI !== 'true' ? 'mosquitto not installed (apt-get install mosquitto mosquitto-clients)' : false;
const ACTOR = 'test';

interface Run { code: number | null; stdout: string; stderr: string }

function run(cmd: string, args: string[], timeoutMs = 15000): Promise<Run> {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : null) : 0;
      resolve({ code, stdout, stderr });
    });
    child.stdin?.end(); // openssl s_client reads stdin
  });
}

async function waitListening(port: number, child: ChildProcess, log: () => string, ms = 10000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`mosquitto exited (${child.exitCode}):\n${log()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const sock = connect(port, '127.0.0.1', () => { sock.destroy(); resolve(true); });
      sock.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`mosquitto did not listen on ${port}:\n${log()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

interface Device { udid: string; cert: IssuedCertificate; certFile: string; keyFile: string }

describe('Mosquitto with Hallmark identities', { skip }, () => {
  let t: TestAuthority;
  let authority: Authority;
  let tmp: TempDir;
  let brokerDir: string;
  let config: MosquittoConfig;
  let port: number;
  let broker: ChildProcess;
  let brokerLog = '';
  const devices: Device[] = [];
  const dev = (i: number): Device => devices[i]!;
  const tls = (d: { certFile: string; keyFile: string }): string[] => ['--cafile', config.files.ca, '--cert', d.certFile, '--key', d.keyFile, '-h', '127.0.0.1', '-p', String(port)];
  const pub = (d: { certFile: string; keyFile: string }, topic: string, message: string, extra: string[] = []): Promise<Run> =>
    run('mosquitto_pub', [...tls(d), '-V', 'mqttv5', '-q', '1', '-t', topic, '-m', message, ...extra]);

  before(async () => {
    assert.ok(haveMosquitto, `${MOSQUITTO}, mosquitto_pub and mosquitto_sub are required under CI=true (apt-get install mosquitto mosquitto-clients)`);
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    tmp = await makeTempDir('hallmark-mosquitto-');
    brokerDir = join(tmp.path, 'broker');

    await authority.registry.createProduct({ name: 'mqtt-meter', actor: ACTOR });
    await authority.registry.createLine({ name: 'mqtt-line', ca: 'issuing-1', actor: ACTOR });
    const batch = await authority.registry.createBatch({ product: 'mqtt-meter', line: 'mqtt-line', quota: 10, actor: ACTOR });
    const keys = Array.from({ length: 4 }, () => generateKeyPairSync('ec', { namedCurve: 'P-256' }));
    const spkis = keys.map((k) => k.publicKey.export({ type: 'spki', format: 'der' }));
    await authority.registry.registerDevices(batch, spkis.map((publicKeySpki) => ({ publicKeySpki })), ACTOR);
    for (let i = 0; i < keys.length; i++) {
      const udid = createHash('sha256').update(spkis[i]!).digest('hex');
      const cert = await authority.issueForDevice({ udid, csr: createCsr({ subject: encodeNameString('CN=ignored'), privateKey: keys[i]!.privateKey }), actor: ACTOR });
      const certFile = join(tmp.path, `dev-${i}.pem`);
      const keyFile = join(tmp.path, `dev-${i}.key`);
      await writeFile(certFile, encodePem('CERTIFICATE', cert.der) + encodePem('CERTIFICATE', cert.chain[0]!));
      await writeFile(keyFile, keys[i]!.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });
      devices.push({ udid, cert, certFile, keyFile });
    }

    port = await freePort();
    config = await writeMosquittoConfig(authority, { dir: brokerDir, port, actor: ACTOR });
    broker = spawn(MOSQUITTO, ['-c', config.files.config], { stdio: ['ignore', 'pipe', 'pipe'] });
    broker.stdout!.on('data', (d: Buffer) => { brokerLog += d.toString(); });
    broker.stderr!.on('data', (d: Buffer) => { brokerLog += d.toString(); });
    await waitListening(port, broker, () => brokerLog);
  });

  after(async () => {
    if (broker && broker.exitCode === null) {
      const exited = new Promise((r) => broker.once('exit', r));
      broker.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
      if (broker.exitCode === null) broker.kill('SIGKILL');
    }
    await authority?.close();
    await tmp?.cleanup();
    await t?.cleanup();
  });

  test('the generated files: listener with require_certificate and use_identity_as_username, the key 0600, the CN is the UDID', async () => {
    const conf = await readFile(config.files.config, 'utf8');
    assert.match(conf, new RegExp(`^listener ${port} 127\\.0\\.0\\.1$`, 'm'));
    for (const line of ['per_listener_settings true', 'require_certificate true', 'use_identity_as_username true', `crlfile ${config.files.crl}`, `cafile ${config.files.ca}`, `pid_file ${config.files.pid}`, `acl_file ${config.files.acl}`]) {
      assert.ok(conf.split('\n').includes(line), `mosquitto.conf has "${line}"`);
    }
    // The device listener's section (after its listener line) has the ACL and no plugin; the plugin serves only the admin listener before it.
    const deviceSection = conf.slice(conf.indexOf(`listener ${port} `));
    assert.doesNotMatch(deviceSection, /^plugin /m);
    // One product on the default policy: pattern lines serve every device.
    const acl = await readFile(config.files.acl, 'utf8');
    assert.match(acl, /^# Layout: uniform/m);
    assert.match(acl, /^pattern write devices\/%u\/#\npattern read devices\/%u\/commands\/#$/m);
    assert.doesNotMatch(acl, /^user /m);
    assert.equal(config.acl.layout, 'uniform');
    const { statSync } = await import('node:fs');
    assert.equal(statSync(config.files.key).mode & 0o777, 0o600);
    assert.match(await readFile(config.files.crl, 'utf8'), /^-----BEGIN X509 CRL-----/);
    assert.equal((await readFile(config.files.ca, 'utf8')).match(/BEGIN CERTIFICATE/g)?.length, 2, 'issuing-1 and the root');
    assert.match(dev(0).cert.subject, new RegExp(`CN=${dev(0).udid}`));
    assert.equal(await readFile(config.files.pid, 'utf8').then((s) => Number(s.trim())), broker.pid);
  });

  test('a device publishes to its own topics and reads its commands; another device is refused on its topics', async () => {
    const a = dev(0);
    const b = dev(1);
    assert.equal((await pub(a, `devices/${a.udid}/telemetry`, 'hi')).code, 0, brokerLog);

    // stdbuf: mosquitto_sub's stdout is block-buffered on a pipe; its -d lines show the SUBACK at once.
    const sub = spawn('stdbuf', ['-oL', 'mosquitto_sub', ...tls(a), '-V', 'mqttv5', '-q', '1', '-d', '-v', '-C', '2', '-W', '20', '-t', `devices/${a.udid}/commands/#`], { stdio: ['ignore', 'pipe', 'pipe'] });
    let subOut = '';
    sub.stdout!.on('data', (d: Buffer) => { subOut += d.toString(); });
    sub.stderr!.on('data', (d: Buffer) => { subOut += d.toString(); });
    const subExit = new Promise<number | null>((r) => sub.once('exit', (code) => r(code)));
    const deadline = Date.now() + 10000;
    while (!/SUBACK/.test(subOut)) {
      assert.ok(Date.now() < deadline && sub.exitCode === null, `mosquitto_sub did not subscribe: ${subOut}\n${brokerLog}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.doesNotMatch(subOut, /Not authori[sz]ed|failed/i, 'the device may subscribe to its own commands');

    assert.equal((await pub(a, `devices/${a.udid}/commands/ping`, 'ping')).code, 0);
    const evil = await pub(b, `devices/${a.udid}/commands/evil`, 'evil');
    assert.match(`${evil.stdout}${evil.stderr}`, /not authori[sz]ed/i, `B's publish to A's topic is refused (MQTT v5 reason): ${JSON.stringify(evil)}`);
    assert.equal((await pub(a, `devices/${a.udid}/commands/after`, 'after')).code, 0);

    assert.equal(await subExit, 0, subOut);
    const received = subOut.split('\n').filter((l) => l.startsWith(`devices/${a.udid}/`));
    assert.deepEqual(received, [`devices/${a.udid}/commands/ping ping`, `devices/${a.udid}/commands/after after`]);
    assert.doesNotMatch(subOut, /evil/);
  });

  test('a certificate from an unknown CA, even with a registered UDID as CN, is refused at the handshake', async () => {
    const dir = tmp.path;
    const o = (args: string[]) => run('openssl', args);
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
    assert.equal((await o(['req', '-x509', ...ec, '-keyout', join(dir, 'rogue-ca.key'), '-out', join(dir, 'rogue-ca.pem'), '-subj', '/CN=Rogue CA', '-days', '1',
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'])).code, 0);
    assert.equal((await o(['req', '-new', ...ec, '-keyout', join(dir, 'rogue.key'), '-out', join(dir, 'rogue.csr'), '-subj', `/CN=${dev(0).udid}`])).code, 0);
    assert.equal((await o(['x509', '-req', '-in', join(dir, 'rogue.csr'), '-CA', join(dir, 'rogue-ca.pem'), '-CAkey', join(dir, 'rogue-ca.key'), '-CAcreateserial', '-days', '1', '-out', join(dir, 'rogue.pem')])).code, 0);
    const r = await pub({ certFile: join(dir, 'rogue.pem'), keyFile: join(dir, 'rogue.key') }, `devices/${dev(0).udid}/telemetry`, 'forged');
    assert.notEqual(r.code, 0, `a rogue certificate must not connect: ${JSON.stringify(r)}`);
    assert.match(`${r.stdout}${r.stderr}`, /error|tls|handshake|alert/i);
    // and the broker says why
    const deadline = Date.now() + 3000;
    while (!/unknown ca|certificate verify failed|unable to get (local )?issuer/i.test(brokerLog) && Date.now() < deadline) await new Promise((res) => setTimeout(res, 20));
    assert.match(brokerLog, /unknown ca|certificate verify failed|unable to get (local )?issuer/i);
  });

  test('a revoked device is refused at its next connection after refreshMosquittoCrl (SIGHUP); another device keeps publishing', async () => {
    const a = dev(0);
    const c = dev(2);
    assert.equal((await pub(c, `devices/${c.udid}/telemetry`, 'before')).code, 0, brokerLog);
    await authority.revoke({ serial: c.cert.serial }, 'keyCompromise', ACTOR);
    // crl.pem is what the broker knows: until it is refreshed the revoked device still gets in.
    assert.equal((await pub(c, `devices/${c.udid}/telemetry`, 'stale')).code, 0, 'the broker only knows what crl.pem says');

    const refreshed = await refreshMosquittoCrl(authority, brokerDir);
    assert.equal(refreshed.signalled, broker.pid);
    assert.deepEqual(refreshed.cas, ['issuing-1']);
    const crlText = spawnSync('openssl', ['crl', '-in', config.files.crl, '-noout', '-text'], { encoding: 'utf8' }).stdout;
    assert.match(crlText, new RegExp(`Serial Number: ${c.cert.serial.toUpperCase()}`), 'the full CRL in crl.pem lists the revoked serial');

    let refused: Run | undefined;
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline) {
      const r = await pub(c, `devices/${c.udid}/telemetry`, 'after revocation');
      if (r.code !== 0) { refused = r; break; }
      await new Promise((res) => setTimeout(res, 100));
    }
    assert.ok(refused, `the revoked device was still accepted 5 s after the SIGHUP:\n${brokerLog}`);
    assert.match(brokerLog, /Reloading config/);
    // mosquitto_pub only sees the connection drop; over TLS 1.2 the broker's alert names the reason.
    const sc = await run('openssl', ['s_client', '-tls1_2', '-connect', `127.0.0.1:${port}`, '-CAfile', config.files.ca, '-cert', c.certFile, '-key', c.keyFile], 10000);
    assert.match(`${sc.stdout}${sc.stderr}`, /alert certificate revoked|alert number 44/i, `${refused.stderr}\n${sc.stderr}`);
    assert.equal((await pub(a, `devices/${a.udid}/telemetry`, 'still here')).code, 0, 'the other device keeps publishing');
    assert.equal(broker.exitCode, null, 'the broker kept running through the reload');
  });

  test("the broker's own certificate is renewed within 30 days of expiry; Mosquitto serves the new one after its SIGHUP; devices keep publishing", async () => {
    const a = dev(0);
    const DAY = 86_400_000;
    const served = async (): Promise<X509Certificate> => {
      const r = await run('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, '-CAfile', config.files.ca, '-cert', a.certFile, '-key', a.keyFile], 10000);
      const pem = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/.exec(r.stdout);
      assert.ok(pem, `no server certificate in s_client's output:\n${r.stdout.slice(0, 400)}\n${r.stderr}`);
      return new X509Certificate(pem[0]);
    };
    const before = await served();
    const notAfter = new Date(before.validTo);
    const kept = await syncMosquitto(authority, brokerDir, { certificate: { now: new Date(notAfter.getTime() - 40 * DAY) } });
    assert.equal(kept.certificateRenewed, undefined, '40 days left: kept');
    assert.equal(kept.signalled, undefined, 'nothing changed, no reload');

    const renewed = await syncMosquitto(authority, brokerDir, { certificate: { now: new Date(notAfter.getTime() - 10 * DAY) } });
    assert.ok(renewed.certificateRenewed, '10 days left: renewed');
    assert.equal(renewed.signalled, broker.pid);
    const v = spawnSync('openssl', ['verify', '-CAfile', config.files.ca, '-untrusted', config.files.cert, '-purpose', 'sslserver', config.files.cert], { encoding: 'utf8' });
    assert.match(v.stdout, /OK/, v.stderr);
    let now = await served();
    const deadline = Date.now() + 5000;
    while (now.serialNumber.toLowerCase() !== renewed.certificateRenewed.serial && Date.now() < deadline) {
      await new Promise((res) => setTimeout(res, 100));
      now = await served();
    }
    assert.equal(now.serialNumber.toLowerCase(), renewed.certificateRenewed.serial, `Mosquitto still serves the old certificate:\n${brokerLog}`);
    assert.equal(now.subjectAltName, before.subjectAltName, 'same names');
    assert.notEqual(now.publicKey.export({ type: 'spki', format: 'der' }).toString('hex'), before.publicKey.export({ type: 'spki', format: 'der' }).toString('hex'), 'a new key');
    assert.equal((await pub(a, `devices/${a.udid}/telemetry`, 'after the renewal')).code, 0, 'devices keep publishing');
    assert.equal(broker.exitCode, null);
  });

  test('keepMosquittoInStep refreshes the broker on a revocation event', async () => {
    const a = dev(0);
    const d = dev(3);
    assert.equal((await pub(d, `devices/${d.udid}/telemetry`, 'before')).code, 0);
    const errors: unknown[] = [];
    const before = await readFile(config.files.crl, 'utf8');
    const stop = keepMosquittoInStep(authority, brokerDir, { onError: (e) => errors.push(e) });
    try {
      await authority.revoke({ device: d.udid }, 'keyCompromise', ACTOR);
      let refused = false;
      const deadline = Date.now() + 8000;
      while (Date.now() < deadline) {
        if ((await readFile(config.files.crl, 'utf8')) !== before && (await pub(d, `devices/${d.udid}/telemetry`, 'after')).code !== 0) { refused = true; break; }
        await new Promise((res) => setTimeout(res, 100));
      }
      assert.deepEqual(errors, []);
      assert.ok(refused, `the device revoked while keepMosquittoInStep ran was still accepted:\n${brokerLog}`);
      assert.equal((await pub(a, `devices/${a.udid}/telemetry`, 'still here')).code, 0);
    } finally {
      stop();
    }
  });
});
