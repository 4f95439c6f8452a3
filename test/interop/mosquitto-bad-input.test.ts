// Bad client certificates and a stalled TLS client against the real Mosquitto (2.0.x) with the
// configuration writeMosquittoConfig makes, while a good device keeps publishing: its messages must keep
// reaching an independent subscriber (mosquitto_sub) through every case, and the broker must keep running.
//
//   broken chain          a leaf naming issuing-1 as issuer (name and key identifier) but signed by another key
//   huge chain            a leaf with 100 more certificates in the TLS Certificate message; and ~300 KB of them
//   deeply nested chain   a leaf under 40 nested CAs of a foreign root; and a leaf under a CA that issuing-1
//                         (pathLen 0) "signed" (built here with issuing-1's real key)
//   duplicate extensions  a leaf signed by issuing-1's real key, carrying subjectAltName twice
//   stalled handshakes    sockets that send half a ClientHello, or a whole one, and then nothing
//
// Each certificate is refused at the handshake (the client sees the connection fail; the broker logs why)
// and `hallmark connect check` on it exits 1 with a reason. The certificates are built with src/pki's
// encoders (der.ts, certificate.ts, extensions.ts). Outside CI a missing mosquitto skips with the reason.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, generateKeyPairSync, randomBytes, sign, type KeyObject } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { connect as netConnect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import type { MqttClient } from 'mqtt';
import { Authority } from '../../src/authority/authority.js';
import { writeMosquittoConfig, type MosquittoConfig } from '../../src/broker/mosquitto.js';
import { MOSQUITTO_BINARY, MosquittoProcess } from '../../src/broker/mosquitto-process.js';
import { connectOnce } from '../../src/demo/simulator.js';
import { freePort } from '../../src/net.js';
import { SCHEMES } from '../../src/pki/algorithms.js';
import { assembleCertificate, encodeTbsCertificate, parseCertificate } from '../../src/pki/certificate.js';
import { createCsr } from '../../src/pki/csr.js';
import { EKU, authorityKeyIdentifier, basicConstraints, extKeyUsage, keyIdentifier, keyUsage, subjectAltName, subjectKeyIdentifier, extension } from '../../src/pki/extensions.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const haveMosquitto = existsSync(MOSQUITTO_BINARY) && spawnSync('mosquitto_sub', ['--help']).error === undefined;
const skip = !haveMosquitto && process.env.CI !== 'true' ? 'mosquitto not installed (apt-get install mosquitto mosquitto-clients)' : false;
const ACTOR = 'test';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const DAY = 86400e3;

type Sign = (tbs: Buffer) => Promise<Buffer> | Buffer;
const ecKey = (): { privateKey: KeyObject; publicKey: KeyObject } => generateKeyPairSync('ec', { namedCurve: 'P-256' });
const spkiOf = (k: KeyObject): Buffer => k.export({ type: 'spki', format: 'der' });
const signWith = (key: KeyObject): Sign => (tbs) => sign('sha256', tbs, key);

/** One certificate, built by hand: subject key, issuer name and key identifier, signer, extensions as given. */
async function buildCertificate(o: { subject: Buffer; spki: Buffer; issuer: Buffer; issuerKeyId: Buffer; sign: Sign; extensions: Buffer[] }): Promise<Buffer> {
  const tbs = encodeTbsCertificate({
    serial: Buffer.concat([Buffer.from([0x40]), randomBytes(15)]), scheme: SCHEMES.ecdsaSha256, issuer: o.issuer,
    notBefore: new Date(Date.now() - 3600e3), notAfter: new Date(Date.now() + DAY), subject: o.subject, subjectPublicKeyInfo: o.spki, extensions: o.extensions,
  });
  return assembleCertificate(tbs, SCHEMES.ecdsaSha256, await o.sign(tbs));
}

const leafExtensions = (spki: Buffer, issuerKeyId: Buffer): Buffer[] => [
  basicConstraints(false), keyUsage(['digitalSignature']), extKeyUsage([EKU.clientAuth]), subjectKeyIdentifier(keyIdentifier(spki)), authorityKeyIdentifier(issuerKeyId),
];
const caExtensions = (spki: Buffer, issuerKeyId?: Buffer, pathLen?: number): Buffer[] => [
  basicConstraints(true, pathLen), keyUsage(['keyCertSign', 'cRLSign']), subjectKeyIdentifier(keyIdentifier(spki)), ...(issuerKeyId ? [authorityKeyIdentifier(issuerKeyId)] : []),
];

interface Run { code: number | null; stdout: string; stderr: string }
function run(cmd: string, args: string[], env: Record<string, string> = {}, timeoutMs = 30_000): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, encoding: 'utf8', env: { ...process.env, ...env }, maxBuffer: 8 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : null) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** A TLS 1.2 handshake with this client chain (PEM) and key: how it ended (1.2: the broker's alert arrives in the handshake). */
function handshake(port: number, ca: string, certPem: string, key: KeyObject, ms = 10_000): Promise<{ ok: boolean; error?: string; ms: number }> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    let done = false;
    const finish = (r: { ok: boolean; error?: string }): void => { if (!done) { done = true; clearTimeout(timer); socket.destroy(); resolve({ ...r, ms: performance.now() - t0 }); } };
    const socket = tlsConnect({ host: '127.0.0.1', port, ca, cert: certPem, key: key.export({ type: 'pkcs8', format: 'pem' }) as string, servername: 'localhost', minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
    const timer = setTimeout(() => finish({ ok: false, error: 'TIMEOUT' }), ms);
    // TLS 1.2: the server checks the client's certificate before its Finished; once the session is up,
    // an MQTT CONNECT would be read. Wait briefly after secureConnect for a late alert.
    socket.once('secureConnect', () => setTimeout(() => finish({ ok: !socket.destroyed }), 200));
    socket.once('error', (err) => finish({ ok: false, error: `${(err as NodeJS.ErrnoException).code ?? ''} ${err.message}`.trim() }));
    socket.once('close', () => finish({ ok: false, error: 'closed' }));
  });
}

describe('Mosquitto: bad client certificates and stalled handshakes are refused; a good device is not affected', { skip }, () => {
  let t: TestAuthority;
  let authority: Authority;
  let tmp: TempDir;
  let config: MosquittoConfig;
  let port: number;
  let broker: MosquittoProcess;
  let rootPem: string;
  let caPem: string;
  let good: { udid: string; client: MqttClient; closed: boolean };
  let other: { udid: string };
  let subscriber: ChildProcess;
  let subOut = '';
  let ticker: NodeJS.Timeout | undefined;
  let issuing: Awaited<ReturnType<Authority['signingCa']>>;
  let goodIdentity: { key: KeyObject; certPem: string };
  const env = (): Record<string, string> => ({ HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' });
  const ticks = (): number => subOut.split('\n').filter((l) => l.startsWith(`devices/${good.udid}/commands/tick `)).length;
  const diag = (): string => `--- broker log ---\n${broker.log.slice(-4000)}`;

  /** The good device's ticks keep arriving at the independent subscriber, its session is up, the broker runs. */
  async function goodDeviceUnaffected(after: string): Promise<void> {
    const before = ticks();
    const deadline = Date.now() + 5000;
    while (ticks() < before + 3) {
      assert.ok(Date.now() < deadline, `the good device's messages stopped arriving after ${after}\n${diag()}`);
      await sleep(20);
    }
    assert.equal(good.closed, false, `the good device's session ended after ${after}`);
    assert.ok(broker.running, `the broker died after ${after}\n${diag()}`);
  }

  async function connectCheck(file: string): Promise<Run> {
    const r = await run(process.execPath, [BIN, 'connect', 'check', '--cert', file, '--home', t.home], env());
    assert.equal(r.code, 1, `connect check must refuse ${file}: ${JSON.stringify(r)}`);
    assert.match(`${r.stdout}${r.stderr}`, /REFUSED [A-Z_]+: .+|\[[A-Z_]+\]/, 'with a reason');
    process.stderr.write(`# connect check ${file.split('/').pop()}: ${`${r.stdout}${r.stderr}`.split('\n')[0]}\n`);
    return r;
  }

  /** Refused at the handshake (node:tls and mosquitto_pub), the broker's log saying `why`. */
  async function refusedByBroker(name: string, chainPem: string, key: KeyObject, why: RegExp, alert: RegExp): Promise<void> {
    const from = broker.log.length;
    const h = await handshake(port, caPem, chainPem, key);
    assert.equal(h.ok, false, `${name}: the broker accepted the handshake\n${diag()}`);
    assert.match(h.error ?? '', alert, `${name}: the broker's TLS alert`);
    const certFile = join(tmp.path, `${name}.pem`);
    const keyFile = join(tmp.path, `${name}.key`);
    await writeFile(certFile, chainPem);
    await writeFile(keyFile, key.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });
    const p = await run('mosquitto_pub', ['--cafile', config.files.ca, '--cert', certFile, '--key', keyFile, '-h', '127.0.0.1', '-p', String(port), '-t', 'x', '-m', 'x'], {}, 15_000);
    assert.notEqual(p.code, 0, `${name}: mosquitto_pub connected`);
    await broker.waitForLog(why, 3000, from);
    const said = broker.log.slice(from).split('\n').filter((l) => /OpenSSL Error|failed|disconnected/.test(l)).map((l) => l.replace(/^\d+: /, ''));
    process.stderr.write(`# ${name}: node:tls "${h.error}"; mosquitto: ${[...new Set(said)].join(' | ')}\n`);
    await goodDeviceUnaffected(name);
  }

  before(async () => {
    assert.ok(haveMosquitto, `${MOSQUITTO_BINARY} and mosquitto_sub are required under CI=true`);
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    tmp = await makeTempDir('hallmark-mq-bad-');
    rootPem = await readFile(t.rootPem, 'utf8');
    issuing = await authority.signingCa('issuing-1');
    await authority.registry.createProduct({ name: 'meter', actor: ACTOR });
    await authority.registry.createLine({ name: 'line-1', ca: 'issuing-1', actor: ACTOR });
    const batch = await authority.registry.createBatch({ product: 'meter', line: 'line-1', quota: 10, actor: ACTOR });
    const made: { udid: string; key: KeyObject; certPem: string }[] = [];
    for (let i = 0; i < 2; i++) {
      const { privateKey, publicKey } = ecKey();
      await authority.registry.registerDevices(batch, [{ publicKeySpki: spkiOf(publicKey) }], ACTOR);
      const udid = createHash('sha256').update(spkiOf(publicKey)).digest('hex');
      const cert = await authority.issueForDevice({ udid, csr: createCsr({ subject: encodeNameString('CN=x'), privateKey }), actor: ACTOR });
      made.push({ udid, key: privateKey, certPem: encodePem('CERTIFICATE', cert.der) + encodePem('CERTIFICATE', cert.chain[0]!) });
    }
    other = { udid: made[1]!.udid };

    port = await freePort();
    config = await writeMosquittoConfig(authority, { dir: join(tmp.path, 'broker'), port, actor: ACTOR });
    caPem = await readFile(config.files.ca, 'utf8');
    broker = new MosquittoProcess(config.files.config, port);
    await broker.start();

    // The good device: a session (the mqtt package) publishing a tick every 50 ms, and an independent subscriber.
    const g = made[0]!;
    goodIdentity = g;
    const { outcome, client } = await connectOnce({ broker: `mqtts://127.0.0.1:${port}`, trust: rootPem, certPem: g.certPem, key: g.key, clientId: 'good', timeoutMs: 10_000 });
    assert.ok(client, JSON.stringify(outcome));
    good = { udid: g.udid, client, closed: false };
    client.on('close', () => { good.closed = true; });
    client.on('error', () => {});
    const certFile = join(tmp.path, 'good.pem');
    const keyFile = join(tmp.path, 'good.key');
    await writeFile(certFile, g.certPem);
    await writeFile(keyFile, g.key.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });
    subscriber = spawn('stdbuf', ['-oL', 'mosquitto_sub', '--cafile', config.files.ca, '--cert', certFile, '--key', keyFile, '-h', '127.0.0.1', '-p', String(port), '-V', 'mqttv5', '-q', '1', '-v', '-t', `devices/${g.udid}/commands/#`], { stdio: ['ignore', 'pipe', 'pipe'] });
    subscriber.stdout!.on('data', (d: Buffer) => { subOut += d.toString(); });
    subscriber.stderr!.on('data', (d: Buffer) => { subOut += d.toString(); });
    let n = 0;
    ticker = setInterval(() => { if (client.connected) client.publish(`devices/${g.udid}/commands/tick`, String(n++), { qos: 1 }); }, 50);
    const deadline = Date.now() + 10_000;
    while (ticks() < 3) {
      assert.ok(Date.now() < deadline, `the subscriber saw no ticks: ${subOut}\n${diag()}`);
      await sleep(20);
    }
  });

  after(async () => {
    if (ticker) clearInterval(ticker);
    good?.client.end(true);
    if (subscriber && subscriber.exitCode === null) subscriber.kill('SIGKILL');
    await broker?.stop();
    await authority?.close();
    await tmp?.cleanup();
    await t?.cleanup();
  });

  test('broken chain: a leaf naming issuing-1 as its issuer, signed by another key', async () => {
    const { privateKey, publicKey } = ecKey();
    const forger = ecKey();
    const der = await buildCertificate({
      subject: encodeNameString(`CN=${other.udid}`), spki: spkiOf(publicKey), issuer: issuing.subject, issuerKeyId: issuing.keyId,
      sign: signWith(forger.privateKey), extensions: leafExtensions(spkiOf(publicKey), issuing.keyId),
    });
    const pem = encodePem('CERTIFICATE', der) + encodePem('CERTIFICATE', issuing.chain[0]!);
    // OpenSSL: the signature does not verify (alert 51 decrypt_error).
    await refusedByBroker('broken-chain', pem, privateKey, /certificate verify failed/, /alert decrypt error|alert number 51/);
    const r = await connectCheck(join(tmp.path, 'broken-chain.pem'));
    assert.match(r.stdout, /REFUSED UNKNOWN_CA: .*verifying signature/);
  });

  test('huge chain: a leaf followed by 100 certificates, and by ~300 KB of them', async () => {
    const rogue = ecKey();
    const rogueName = encodeNameString('CN=Rogue CA');
    const rogueId = keyIdentifier(spkiOf(rogue.publicKey));
    const { privateKey, publicKey } = ecKey();
    const leaf = await buildCertificate({ subject: encodeNameString(`CN=${other.udid}`), spki: spkiOf(publicKey), issuer: rogueName, issuerKeyId: rogueId, sign: signWith(rogue.privateKey), extensions: leafExtensions(spkiOf(publicKey), rogueId) });
    const junk: Buffer[] = [];
    for (let i = 0; i < 100; i++) {
      const k = ecKey();
      const name = encodeNameString(`CN=Junk ${i}`);
      const id = keyIdentifier(spkiOf(k.publicKey));
      junk.push(await buildCertificate({ subject: name, spki: spkiOf(k.publicKey), issuer: name, issuerKeyId: id, sign: signWith(k.privateKey), extensions: caExtensions(spkiOf(k.publicKey)) }));
    }
    const pem = [leaf, ...junk].map((d) => encodePem('CERTIFICATE', d)).join('');
    await refusedByBroker('huge-chain', pem, privateKey, /certificate verify failed/, /alert unknown ca|alert number 48/);
    const r = await connectCheck(join(tmp.path, 'huge-chain.pem'));
    assert.match(r.stdout, /REFUSED MALFORMED: the chain has 101 certificates, over the limit of 8/);

    // Over OpenSSL's limit on a Certificate message (100 KB by default): cut off before any verification.
    const padded: Buffer[] = [];
    for (let i = 0; i < 100; i++) {
      const k = ecKey();
      const name = encodeNameString(`CN=Padded ${i}`);
      const id = keyIdentifier(spkiOf(k.publicKey));
      const pad = extension('1.3.6.1.4.1.99999.1', false, Buffer.concat([Buffer.from([0x04, 0x82, 0x0b, 0xb8]), randomBytes(3000)]));
      padded.push(await buildCertificate({ subject: name, spki: spkiOf(k.publicKey), issuer: name, issuerKeyId: id, sign: signWith(k.privateKey), extensions: [...caExtensions(spkiOf(k.publicKey)), pad] }));
    }
    const bigPem = [leaf, ...padded].map((d) => encodePem('CERTIFICATE', d)).join('');
    const from = broker.log.length;
    const h = await handshake(port, caPem, bigPem, privateKey);
    assert.equal(h.ok, false, diag());
    assert.match(h.error ?? '', /alert illegal parameter|alert number 47/);
    await broker.waitForLog(/excessive message size/, 3000, from);
    await goodDeviceUnaffected('a 300 KB chain');

    // A genuine device certificate with the same 100 certificates after it: OpenSSL builds the path from
    // its own trust store and ignores what it does not need, so Mosquitto accepts it (within the 100 KB
    // limit); the connection decision, stricter, refuses chains over 8 certificates.
    const d = goodIdentity;
    const padded2 = d.certPem + junk.map((x) => encodePem('CERTIFICATE', x)).join('');
    const ok = await handshake(port, caPem, padded2, d.key);
    assert.equal(ok.ok, true, `a valid leaf with junk after it: ${ok.error}\n${diag()}`);
    await goodDeviceUnaffected('a valid leaf with 100 extra certificates');
  });

  test('deeply nested chain: 40 CAs deep under a foreign root; a CA under issuing-1 (pathLen 0)', async () => {
    const root = ecKey();
    let issuerName = encodeNameString('CN=Nest root');
    let issuerId = keyIdentifier(spkiOf(root.publicKey));
    let issuerKey = root.privateKey;
    const chain: Buffer[] = [];
    for (let i = 0; i < 40; i++) {
      const k = ecKey();
      const name = encodeNameString(`CN=Nest ${i}`);
      chain.unshift(await buildCertificate({ subject: name, spki: spkiOf(k.publicKey), issuer: issuerName, issuerKeyId: issuerId, sign: signWith(issuerKey), extensions: caExtensions(spkiOf(k.publicKey), issuerId) }));
      issuerName = name;
      issuerId = keyIdentifier(spkiOf(k.publicKey));
      issuerKey = k.privateKey;
    }
    const { privateKey, publicKey } = ecKey();
    const leaf = await buildCertificate({ subject: encodeNameString(`CN=${other.udid}`), spki: spkiOf(publicKey), issuer: issuerName, issuerKeyId: issuerId, sign: signWith(issuerKey), extensions: leafExtensions(spkiOf(publicKey), issuerId) });
    await refusedByBroker('nested-chain', [leaf, ...chain].map((d) => encodePem('CERTIFICATE', d)).join(''), privateKey, /certificate verify failed/, /alert unknown ca|alert number 48/);
    assert.match((await connectCheck(join(tmp.path, 'nested-chain.pem'))).stdout, /REFUSED MALFORMED: the chain has 41 certificates, over the limit of 8/);

    // Nested under our own issuing CA, whose pathLen is 0: a sub-CA made with issuing-1's key is refused.
    assert.equal(parseCertificate(issuing.chain[0]!).extensions.has('2.5.29.19'), true);
    const sub = ecKey();
    const subName = encodeNameString('CN=Sub-CA under issuing-1');
    const subCert = await buildCertificate({ subject: subName, spki: spkiOf(sub.publicKey), issuer: issuing.subject, issuerKeyId: issuing.keyId, sign: (tbs) => issuing.signer.sign(tbs), extensions: caExtensions(spkiOf(sub.publicKey), issuing.keyId) });
    const subId = keyIdentifier(spkiOf(sub.publicKey));
    const device = ecKey();
    const subLeaf = await buildCertificate({ subject: encodeNameString(`CN=${other.udid}`), spki: spkiOf(device.publicKey), issuer: subName, issuerKeyId: subId, sign: signWith(sub.privateKey), extensions: leafExtensions(spkiOf(device.publicKey), subId) });
    await refusedByBroker('under-issuing', [subLeaf, subCert, issuing.chain[0]!].map((d) => encodePem('CERTIFICATE', d)).join(''), device.privateKey, /certificate verify failed/, /alert unknown ca|alert number 48/);
    // What OpenSSL's verifier says of it, on its own: the path length constraint.
    await writeFile(join(tmp.path, 'under-issuing-leaf.pem'), encodePem('CERTIFICATE', subLeaf));
    await writeFile(join(tmp.path, 'under-issuing-sub.pem'), encodePem('CERTIFICATE', subCert));
    const v = await run('openssl', ['verify', '-CAfile', config.files.ca, '-untrusted', join(tmp.path, 'under-issuing-sub.pem'), join(tmp.path, 'under-issuing-leaf.pem')]);
    assert.notEqual(v.code, 0);
    assert.match(`${v.stdout}${v.stderr}`, /path length constraint exceeded/);
    const r = await connectCheck(join(tmp.path, 'under-issuing.pem'));
    assert.match(r.stdout, /REFUSED UNKNOWN_CA: /);
  });

  test('duplicate extensions: a leaf signed by issuing-1 itself, with subjectAltName twice', async () => {
    const { privateKey, publicKey } = ecKey();
    const der = await buildCertificate({
      subject: encodeNameString(`CN=${other.udid}`), spki: spkiOf(publicKey), issuer: issuing.subject, issuerKeyId: issuing.keyId,
      sign: (tbs) => issuing.signer.sign(tbs),
      extensions: [...leafExtensions(spkiOf(publicKey), issuing.keyId), subjectAltName({ uri: [`urn:hallmark:udid:${other.udid}`] }), subjectAltName({ dns: ['evil.example'] })],
    });
    assert.deepEqual(parseCertificate(der).extensionOrder.filter((o) => o === '2.5.29.17').length, 2, 'built with two subjectAltName extensions');
    // OpenSSL marks a certificate with a repeated extension invalid (X509 V3 routines::invalid certificate).
    await refusedByBroker('duplicate-extensions', encodePem('CERTIFICATE', der) + encodePem('CERTIFICATE', issuing.chain[0]!), privateKey, /X509 V3 routines::invalid certificate/, /alert unknown ca|alert number 48/);
    // The decision: a certificate of issuing-1 with a verifying signature, but not one the authority issued.
    const r = await connectCheck(join(tmp.path, 'duplicate-extensions.pem'));
    assert.match(r.stdout, /REFUSED UNKNOWN_DEVICE: certificate [0-9a-f]+ of CA issuing-1 is not on record/);
  });

  test('stalled handshakes: half a ClientHello, or a whole one, then silence — the broker keeps serving', async () => {
    // A real ClientHello, captured from node:tls by a local listener.
    const capture = createServer();
    await new Promise<void>((r) => capture.listen(0, '127.0.0.1', r));
    const hello = await new Promise<Buffer>((resolve) => {
      capture.once('connection', (s: Socket) => s.once('data', (d: Buffer) => { resolve(d); s.destroy(); }));
      const c = tlsConnect({ host: '127.0.0.1', port: (capture.address() as { port: number }).port, rejectUnauthorized: false });
      c.on('error', () => {});
    });
    capture.close();
    assert.equal(hello[0], 0x16, 'a TLS handshake record');

    const stalled: Socket[] = [];
    const closed = new Set<Socket>();
    for (let i = 0; i < 50; i++) {
      const s = netConnect(port, '127.0.0.1');
      s.on('error', () => {});
      s.on('close', () => closed.add(s));
      await new Promise<void>((r) => s.once('connect', () => r()));
      s.write(i % 2 === 0 ? hello.subarray(0, Math.floor(hello.length / 2)) : hello);
      stalled.push(s);
    }
    try {
      await goodDeviceUnaffected('50 stalled handshakes');
      // New devices still get in, promptly.
      const good2 = await run('mosquitto_pub', ['--cafile', config.files.ca, '--cert', join(tmp.path, 'good.pem'), '--key', join(tmp.path, 'good.key'), '-h', '127.0.0.1', '-p', String(port), '-V', 'mqttv5', '-q', '1', '-t', `devices/${good.udid}/commands/probe`, '-m', 'probe'], {}, 10_000);
      assert.equal(good2.code, 0, `${JSON.stringify(good2)}\n${diag()}`);
      const deadline = Date.now() + 5000;
      while (!subOut.includes(`devices/${good.udid}/commands/probe probe`)) {
        assert.ok(Date.now() < deadline, 'the probe arrived');
        await sleep(20);
      }
      process.stderr.write(`# stalled handshakes: ${closed.size}/50 closed by the broker so far\n`);
    } finally {
      for (const s of stalled) s.destroy();
    }
    await goodDeviceUnaffected('the stalled sockets went away');
  });
});
