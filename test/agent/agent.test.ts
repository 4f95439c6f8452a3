// The device agent (src/agent) against a real Hallmark server in this process: EST over the HTTPS
// listener, claims, registered keys with channel binding under TLS 1.2 and 1.3, re-enrolment with the
// current certificate (same key and rekey), the CLI as a child process, and a key held in SoftHSM2.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { enrol, reenrol, renewIfDue, verifyCaCertificates, type EnrolmentInfo } from '../../src/agent/agent.js';
import { normaliseSerialHex } from '../../src/pki/certificate.js';
import { challengePasswordAttribute, openDeviceKey, type DeviceKey } from '../../src/agent/device-key.js';
import { EstClient, EstClientError } from '../../src/agent/est-client.js';
import { Authority } from '../../src/authority/authority.js';
import { createClaim } from '../../src/enrollment/claims.js';
import { createLogger } from '../../src/log.js';
import { parseCsr } from '../../src/pki/csr.js';
import { csrChallengePassword } from '../../src/protocols/est/wire.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { opensslPkcs11Skip, softHsmOpensslKeyOrSkip, type SoftHsmOpensslKey } from '../helpers/openssl-pkcs11.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const REPO = resolve(fileURLToPath(import.meta.url), '../../../..');
const DAY = 86400e3;

interface Run { code: number | null; stdout: string; stderr: string }

/** The CLI as a child process, asynchronously: the server answering it runs in this process. */
function cli(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<Run> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(process.execPath, [join(REPO, 'bin/hallmark.js'), ...args], { cwd: REPO, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill(), 60_000);
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('close', (code) => { clearTimeout(timer); resolveRun({ code, stdout, stderr }); });
  });
}

async function rejectsWith(p: Promise<unknown>, code: string, status?: number): Promise<EstClientError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof EstClientError, `expected an EstClientError ${code}, got ${String((err as Error)?.stack ?? err)}`);
    assert.equal(err.code, code, err.message);
    if (status !== undefined) assert.equal(err.status, status, err.message);
    return err;
  }
  assert.fail(`expected ${code}, but it succeeded`);
}

describe('device agent (EST client) against a running server', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let tmp: TempDir;
  let rootPem: string;
  let logLines: string[];
  let openBatch: string;       // product "sensor", unregistered keys allowed (claims)
  let registeredBatch: string; // product "sensor", registered keys only
  let rekeyBatch: string;      // product "rekeyable" (allowRekey), unregistered keys allowed
  const secrets: string[] = [];
  const keys: DeviceKey[] = [];

  const newKeyFile = (name: string): string => {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const path = join(tmp.path, `${name}.key`);
    writeFileSync(path, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    return path;
  };
  const newKey = async (name: string): Promise<{ path: string; key: DeviceKey }> => {
    const path = newKeyFile(name);
    const key = await openDeviceKey(path);
    keys.push(key);
    return { path, key };
  };
  const claim = async (batch: string, uses = 5): Promise<string> => {
    const c = await createClaim(authority.store, { batch, uses, ttlMs: DAY, actor: 'test' });
    secrets.push(c.secret);
    return c.basic;
  };
  const server = (): string => servers.httpsUrl;

  /** openssl verify of the stored certificate against the root and the stored chain. */
  function opensslVerifies(info: EnrolmentInfo): void {
    execFileSync('openssl', ['verify', '-CAfile', t.rootPem, '-untrusted', info.files.chain, '-purpose', 'sslclient', info.files.cert], { stdio: 'pipe' });
  }

  async function issuedAudit(serial: string): Promise<Record<string, unknown>> {
    const rows = await authority.store.db.selectFrom('audit_log').select(['target', 'details']).where('action', '=', 'certificate.issue').execute();
    const norm = (s: string): string => s.toLowerCase().replace(/^0+/, '');
    const row = rows.find((r) => norm(r.target) === norm(serial));
    assert.ok(row, `no certificate.issue audit entry for ${serial}`);
    return JSON.parse(row.details) as Record<string, unknown>;
  }

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    logLines = [];
    const sink = { write: (line: string) => { logLines.push(line); return true; } } as unknown as NodeJS.WritableStream;
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(sink) });
    tmp = await makeTempDir('hallmark-agent-test-');
    rootPem = readFileSync(t.rootPem, 'utf8');
    const registry = authority.registry;
    await registry.createProduct({ name: 'sensor', actor: 'test' });
    await registry.createProduct({ name: 'rekeyable', allowRekey: true, actor: 'test' });
    await registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: 'test' });
    openBatch = await registry.createBatch({ product: 'sensor', line: 'line-a', quota: 100, allowUnregistered: true, actor: 'test' });
    registeredBatch = await registry.createBatch({ product: 'sensor', line: 'line-a', quota: 100, actor: 'test' });
    rekeyBatch = await registry.createBatch({ product: 'rekeyable', line: 'line-a', quota: 100, allowUnregistered: true, actor: 'test' });
  });

  after(async () => {
    for (const k of keys) await k.close().catch(() => {});
    await servers?.close();
    await authority?.close();
    await tmp?.cleanup();
    await t?.cleanup();
  });

  test('cacerts and csrattrs: certs-only decoded, and every CA certificate chains to the pinned root', async () => {
    const client = new EstClient({ server: server(), trust: rootPem });
    try {
      const cas = await client.cacerts();
      assert.ok(cas.length >= 2, 'issuing CA and root');
      const verified = verifyCaCertificates(client.trustAnchors, cas);
      assert.ok(verified.some((v) => v.path.length === 1 && v.cert.subject.includes('CN=')), 'the issuing CA chains to the root');
      const attrs = await client.csrattrs();
      assert.ok(attrs.some((a) => 'oid' in a && a.oid === '1.2.840.113549.1.9.7'), 'challengePassword requested');
      // Both requests went over one kept-alive connection.
      assert.ok(client.protocol === 'TLSv1.3' || client.protocol === 'TLSv1.2');
      // A labelled client: a line label answers with that line's chain.
      const labelled = new EstClient({ server: server(), trust: rootPem, label: 'line-a' });
      try {
        assert.equal((await labelled.cacerts()).length, 2);
        await rejectsWith(new EstClient({ server: server(), trust: rootPem, label: 'no-such-label' }).cacerts(), 'NOT_FOUND', 404);
      } finally {
        labelled.destroy();
      }
    } finally {
      client.destroy();
    }
    // A root that did not sign the CAs: the cacerts check refuses them.
    const other = generateSelfSignedRoot(tmp.path);
    const cas = await (async () => { const c = new EstClient({ server: server(), trust: rootPem }); try { return await c.cacerts(); } finally { c.destroy(); } })();
    assert.throws(() => verifyCaCertificates([new X509Certificate(readFileSync(other))], cas), (e: unknown) => e instanceof EstClientError && e.code === 'EST_CA_UNTRUSTED');
  });

  test('claim enrolment with an unregistered key in an --allow-unregistered batch', async () => {
    const { key } = await newKey('claim-device');
    const basic = await claim(openBatch);
    const stateDir = join(tmp.path, 'state-claim');
    const info = await enrol({ server: server(), trust: rootPem, key, claim: basic, stateDir });
    assert.equal(info.authenticator, 'claim');
    assert.equal(info.udid, key.udid, 'the registry names the device by its key (CN = UDID)');
    assert.equal(info.channelBinding, undefined);
    assert.equal(info.chain.length, 1, 'chain.pem holds the issuing CA, not the root');
    opensslVerifies(info);
    const cert = new X509Certificate(readFileSync(info.files.cert));
    assert.ok(cert.publicKey.export({ type: 'spki', format: 'der' }).equals(key.publicKeySpki));
    const device = await authority.registry.device(key.udid);
    assert.equal(device.batch, openBatch, 'registered on first use in the claim\'s batch');
    const summary = JSON.parse(readFileSync(info.files.info, 'utf8'));
    assert.equal(summary.udid, key.udid);
    assert.ok(!JSON.stringify(summary).includes(basic.split(':')[1]!), 'the claim secret is not stored');
    assert.equal((await issuedAudit(info.serial)).authenticator, 'claim');

    // The same device cannot enrol twice with one claim; a wrong secret is 401 with the server's code.
    await rejectsWith(enrol({ server: server(), trust: rootPem, key, claim: basic, stateDir: join(tmp.path, 'state-claim-again') }), 'CLAIM_ALREADY_USED', 403);
    const wrong = await rejectsWith(enrol({ server: server(), trust: rootPem, key, claim: `${basic.split(':')[0]}:wrong-secret`, stateDir: join(tmp.path, 'x') }), 'CLAIM_INVALID', 401);
    assert.match(wrong.serverMessage ?? '', /claim/);
    assert.ok(!existsSync(join(tmp.path, 'x', 'cert.pem')), 'nothing stored on failure');

    // Re-enrolment with the current certificate, same key.
    const renewed = await reenrol({ server: server(), trust: rootPem, key, stateDir });
    assert.equal(renewed.authenticator, 'current-certificate');
    assert.equal(renewed.udid, key.udid);
    assert.notEqual(renewed.serial, info.serial);
    assert.equal(renewed.rekeyed, false);
    opensslVerifies(renewed);
    assert.notEqual(readFileSync(info.files.cert, 'utf8'), encodeCert(info.certificate), 'cert.pem was replaced');
    assert.equal((await issuedAudit(renewed.serial)).authenticator, 'current-certificate');

    // Rekey is refused for a product without allowRekey, and nothing is replaced.
    const before = readFileSync(renewed.files.cert, 'utf8');
    const { key: other } = await newKey('claim-device-new');
    await rejectsWith(reenrol({ server: server(), trust: rootPem, key, stateDir, newKey: other }), 'KEY_MISMATCH', 403);
    assert.equal(readFileSync(renewed.files.cert, 'utf8'), before);
  });

  test('rekey on re-enrolment for a product created with allowRekey', async () => {
    const { key } = await newKey('rekey-old');
    const { key: fresh } = await newKey('rekey-new');
    const stateDir = join(tmp.path, 'state-rekey');
    const first = await enrol({ server: server(), trust: rootPem, key, claim: await claim(rekeyBatch), stateDir });
    const second = await reenrol({ server: server(), trust: rootPem, key, newKey: fresh, stateDir });
    assert.equal(second.rekeyed, true);
    assert.equal(second.udid, first.udid, 'still the same device');
    const cert = new X509Certificate(readFileSync(second.files.cert));
    assert.ok(cert.publicKey.export({ type: 'spki', format: 'der' }).equals(fresh.publicKeySpki), 'the new certificate carries the new key');
    opensslVerifies(second);
    // The next renewal authenticates with the new key and certificate; the old key no longer matches.
    await assert.rejects(reenrol({ server: server(), trust: rootPem, key, stateDir }), (e: unknown) => e instanceof EstClientError && e.code === 'EST_BAD_OPTIONS');
    const third = await reenrol({ server: server(), trust: rootPem, key: fresh, stateDir });
    assert.equal(third.udid, first.udid);
  });

  test('renewIfDue: nothing before the window (device side, then server side); renews inside it', async () => {
    await authority.registry.createProduct({ name: 'windowed', validityDays: 10, renewAfterPercent: 50, actor: 'test' });
    const windowedBatch = await authority.registry.createBatch({ product: 'windowed', line: 'line-a', quota: 10, allowUnregistered: true, actor: 'test' });
    const { key } = await newKey('windowed');
    const stateDir = join(tmp.path, 'state-windowed');
    const first = await enrol({ server: server(), trust: rootPem, key, claim: await claim(windowedBatch), stateDir });
    // The device's own threshold (66 %) is not reached: no request is made.
    const early = await renewIfDue({ server: server(), trust: rootPem, key, stateDir });
    assert.equal(early.renewed, false);
    assert.ok(!early.renewed && early.dueAt > new Date(Date.now() + 6 * 86400e3));
    // A device that thinks it is due (threshold 0) is told by the server when the window opens (50 %).
    const told = await renewIfDue({ server: server(), trust: rootPem, key, stateDir, renewAfterPercent: 0 });
    assert.equal(told.renewed, false);
    assert.ok(!told.renewed && Math.abs(told.dueAt.getTime() - (Date.parse(first.notBefore) + 5 * 86400e3)) < 120e3, !told.renewed ? told.reason : '');
    // Seven days on (the certificate's recorded validity moved back), both agree: renewed.
    await authority.store.db.updateTable('certificates').set({ not_before: new Date(Date.now() - 7 * 86400e3).toISOString(), not_after: new Date(Date.now() + 3 * 86400e3).toISOString() })
      .where('serial', '=', normaliseSerialHex(first.serial)).execute();
    const late = await renewIfDue({ server: server(), trust: rootPem, key, stateDir, now: new Date(Date.now() + 7 * 86400e3) });
    assert.equal(late.renewed, true);
    assert.notEqual(late.renewed && late.info.serial, first.serial);
  });

  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    test(`registered-key enrolment with channel binding under ${version}`, async () => {
      const { key } = await newKey(`registered-${version}`);
      await authority.registry.registerDevice(registeredBatch, { publicKeySpki: key.publicKeySpki }, 'test');
      const stateDir = join(tmp.path, `state-registered-${version}`);
      const info = await enrol({ server: server(), trust: rootPem, key, stateDir, minVersion: version, maxVersion: version });
      assert.equal(info.authenticator, 'registered-key');
      assert.equal(info.tlsVersion, version);
      const expected = version === 'TLSv1.2' ? 'tls-unique' : 'tls-exporter';
      assert.equal(info.channelBinding, expected);
      assert.equal((await issuedAudit(info.serial)).channelBinding, expected, 'the server checked the binding');
      opensslVerifies(info);
      // Renewal with the certificate just issued works under the same version.
      const renewed = await reenrol({ server: server(), trust: rootPem, key, stateDir, minVersion: version, maxVersion: version });
      assert.equal(renewed.tlsVersion, version);
    });

    test(`a CSR bound to another connection is refused (${version})`, async () => {
      const { key } = await newKey(`replay-${version}`);
      await authority.registry.registerDevice(registeredBatch, { publicKeySpki: key.publicKeySpki }, 'test');
      const a = new EstClient({ server: server(), trust: rootPem, minVersion: version, maxVersion: version });
      const b = new EstClient({ server: server(), trust: rootPem, minVersion: version, maxVersion: version });
      try {
        const binding = await a.channelBinding();
        assert.ok(binding && binding.value.length >= 12);
        const csr = await key.createCsr({ challengePassword: binding.value.toString('base64') });
        assert.equal(csrChallengePassword(parseCsr(csr)), binding.value.toString('base64'));
        await rejectsWith(b.simpleEnroll(csr), 'CHANNEL_BINDING_MISMATCH', 403);
        // The same CSR on its own connection is accepted.
        const issued = await a.simpleEnroll(csr);
        assert.ok(new X509Certificate(issued.certificate).publicKey.export({ type: 'spki', format: 'der' }).equals(key.publicKeySpki));
      } finally {
        a.destroy();
        b.destroy();
      }
    });
  }

  test('one kept-alive connection carries several requests; a connection the server dropped is replaced', async () => {
    const serverSockets: import('node:tls').TLSSocket[] = [];
    const onConnection = (s: import('node:tls').TLSSocket): void => { serverSockets.push(s); };
    servers.https.server.on('secureConnection', onConnection);
    const { key } = await newKey('keepalive');
    await authority.registry.registerDevice(registeredBatch, { publicKeySpki: key.publicKeySpki }, 'test');
    const client = new EstClient({ server: server(), trust: rootPem });
    try {
      await client.cacerts();
      await client.csrattrs();
      await client.cacerts();
      assert.equal(serverSockets.length, 1, 'three requests, one TLS connection');
      // The server drops the idle connection (as its keep-alive timeout does): the next request reconnects,
      // and a bound CSR is made for the new connection.
      serverSockets[0]!.destroy();
      await new Promise((r) => setTimeout(r, 50));
      await client.cacerts();
      assert.equal(serverSockets.length, 2);
      serverSockets[1]!.destroy();
      await new Promise((r) => setTimeout(r, 50));
      const issued = await client.enrollWithBinding((binding) => key.createCsr({ challengePassword: binding.value.toString('base64') }));
      assert.ok(issued.channelBinding);
      assert.equal(serverSockets.length, 3);
    } finally {
      client.destroy();
      servers.https.server.off('secureConnection', onConnection);
    }
  });

  test('an unregistered key with no credential is refused with 401', async () => {
    const { key } = await newKey('nobody');
    await rejectsWith(enrol({ server: server(), trust: rootPem, key, stateDir: join(tmp.path, 'state-nobody') }), 'EST_CREDENTIALS_REQUIRED', 401);
  });

  test('a wrong pinned root is refused by the client before anything is sent', async () => {
    const { key } = await newKey('wrong-root');
    const basic = await claim(openBatch);
    const otherRoot = readFileSync(generateSelfSignedRoot(tmp.path), 'utf8');
    const stateDir = join(tmp.path, 'state-wrong-root');
    await rejectsWith(enrol({ server: server(), trust: otherRoot, key, claim: basic, stateDir }), 'EST_SERVER_UNTRUSTED', 0);
    assert.ok(!existsSync(join(stateDir, 'cert.pem')));
    const used = await authority.store.db.selectFrom('claims').select('used').where('id', '=', basic.split(':')[0]!).executeTakeFirstOrThrow();
    assert.equal(Number(used.used), 0, 'the claim was never presented');
    // Not the system store either: with the pinned root the same call works.
    const info = await enrol({ server: server(), trust: rootPem, key, claim: basic, stateDir });
    assert.equal(info.udid, key.udid);
  });

  test('timeouts and response size limits', async () => {
    const { createServer } = await import('node:net');
    // A TCP server that accepts and never answers the TLS handshake.
    const silent = createServer(() => {});
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', () => r()));
    const port = (silent.address() as { port: number }).port;
    try {
      const client = new EstClient({ server: `https://127.0.0.1:${port}`, trust: rootPem, timeoutMs: 300 });
      await rejectsWith(client.cacerts(), 'EST_TIMEOUT', 0);
      client.destroy();
    } finally {
      silent.close();
    }
    const small = new EstClient({ server: server(), trust: rootPem, maxResponseBytes: 200 });
    try {
      await rejectsWith(small.cacerts(), 'EST_RESPONSE_TOO_LARGE');
    } finally {
      small.destroy();
    }
  });

  test('serverkeygen: the key comes back with its certificate; refused for a product that does not allow it', async () => {
    await authority.registry.createProduct({ name: 'keygen', allowServerKeygen: true, actor: 'test' });
    const batch = await authority.registry.createBatch({ product: 'keygen', line: 'line-a', quota: 10, allowUnregistered: true, actor: 'test' });
    const { key } = await newKey('keygen-device');
    const client = new EstClient({ server: server(), trust: rootPem, basic: await claim(batch) });
    try {
      const r = await client.serverKeygen(await key.createCsr());
      const { createPrivateKey, createPublicKey } = await import('node:crypto');
      const generated = createPublicKey(createPrivateKey({ key: r.privateKeyPkcs8, format: 'der', type: 'pkcs8' })).export({ type: 'spki', format: 'der' });
      assert.ok(new X509Certificate(r.certificate).publicKey.export({ type: 'spki', format: 'der' }).equals(generated));
      assert.ok(!generated.equals(key.publicKeySpki), 'a new key, not the CSR key');
    } finally {
      client.destroy();
    }
    const { key: other } = await newKey('keygen-refused');
    const refused = new EstClient({ server: server(), trust: rootPem, basic: await claim(openBatch) });
    try {
      await rejectsWith(refused.serverKeygen(await other.createCsr()), 'SERVER_KEYGEN_NOT_ALLOWED', 403);
    } finally {
      refused.destroy();
    }
  });

  test('device keys from files: PEM or DER PKCS#8, encrypted with a passphrase', async () => {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const der = join(tmp.path, 'der.key');
    writeFileSync(der, privateKey.export({ type: 'pkcs8', format: 'der' }));
    const enc = join(tmp.path, 'enc.key');
    writeFileSync(enc, privateKey.export({ type: 'pkcs8', format: 'pem', cipher: 'aes-256-cbc', passphrase: 'open sesame' }));
    const a = await openDeviceKey(der);
    const b = await openDeviceKey(enc, { passphrase: 'open sesame' });
    assert.ok(a.publicKeySpki.equals(b.publicKeySpki));
    assert.equal(a.udid, b.udid);
    assert.match(a.udid, /^[0-9a-f]{64}$/);
    await assert.rejects(openDeviceKey(enc), (e: unknown) => (e as { code?: string }).code === 'PASSPHRASE_REQUIRED');
    await assert.rejects(openDeviceKey(enc, { passphrase: 'wrong' }), (e: unknown) => (e as { code?: string }).code === 'BAD_PASSPHRASE');
    await assert.rejects(openDeviceKey(join(tmp.path, 'missing.key')), (e: unknown) => (e as { code?: string }).code === 'KEY_NOT_FOUND');
    const csr = parseCsr(await b.createCsr());
    assert.equal(csrChallengePassword(csr), undefined);
  });

  test('the challengePassword attribute encodes as PrintableString or UTF8String', () => {
    const printable = challengePasswordAttribute('abc+/=');
    assert.equal(printable.toString('hex').includes('1306616263' + '2b2f3d'), true);
    const utf8 = challengePasswordAttribute('pässword');
    assert.ok(utf8.includes(Buffer.from([0x0c])), 'UTF8String tag');
  });

  test('CLI: hallmark agent enroll and reenroll end to end; secrets never printed', async () => {
    const keyPath = newKeyFile('cli-device');
    const basic = await claim(openBatch);
    const out = join(tmp.path, 'state-cli');
    const enrolRun = await cli(['agent', 'enroll', '--server', server(), '--trust', t.rootPem, '--key', keyPath, '--claim', basic, '--out', out, '--json']);
    assert.equal(enrolRun.code, 0, enrolRun.stderr);
    const result = JSON.parse(enrolRun.stdout);
    assert.equal(result.authenticator, 'claim');
    assert.match(result.udid, /^[0-9a-f]{64}$/);
    assert.ok(existsSync(join(out, 'cert.pem')) && existsSync(join(out, 'chain.pem')));
    execFileSync('openssl', ['verify', '-CAfile', t.rootPem, '-untrusted', join(out, 'chain.pem'), join(out, 'cert.pem')], { stdio: 'pipe' });
    const secret = basic.split(':')[1]!;
    assert.ok(!enrolRun.stdout.includes(secret) && !enrolRun.stderr.includes(secret), 'the claim secret is not printed');
    assert.equal(readFileSync(keyPath, 'utf8').includes('PRIVATE KEY'), true, 'key file untouched');

    const again = await cli(['agent', 'reenroll', '--server', server(), '--trust', t.rootPem, '--key', keyPath, '--out', out]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /Re-enrolled device [0-9a-f]{64} \(current-certificate/);

    // Errors: the server's code, exit 1, and still no secret; the claim may also come from a file.
    const claimFile = join(tmp.path, 'claim.txt');
    writeFileSync(claimFile, `${basic.split(':')[0]}:not-the-secret\n`, { mode: 0o600 });
    const refused = await cli(['agent', 'enroll', '--server', server(), '--trust', t.rootPem, '--key', newKeyFile('cli-2'), '--claim-file', claimFile, '--out', join(tmp.path, 'state-cli-2')]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /\[CLAIM_INVALID, HTTP 401\]/);
    assert.ok(!refused.stderr.includes('not-the-secret'));
    const untrusted = await cli(['agent', 'enroll', '--server', server(), '--trust', t.intermediatePem, '--key', keyPath, '--claim', basic, '--out', join(tmp.path, 'state-cli-3')]);
    assert.equal(untrusted.code, 1);
    assert.match(untrusted.stderr, /EST_SERVER_UNTRUSTED/);
    assert.ok(!untrusted.stderr.includes(secret));
    const usage = await cli(['agent', 'enroll', '--server', server(), '--key', keyPath]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--trust is required/);
  });

  describe('a device key held in SoftHSM2', { skip: opensslPkcs11Skip() }, () => {
    let p11: SoftHsmOpensslKey | undefined;

    after(async () => {
      await p11?.cleanup();
    });

    test('enrol by registered key (CSR signed in the token), re-enrol with TLS client authentication through the OpenSSL pkcs11 engine, and the CLI', async (tc) => {
      p11 = await softHsmOpensslKeyOrSkip(tc, { keyLabel: 'agent key' });
      if (!p11) return;
      secrets.push(p11.token.pin);
      const key = await openDeviceKey(p11.keyUri, { module: p11.token.module });
      keys.push(key);
      assert.equal(key.kind, 'pkcs11');
      assert.ok(key.publicKeySpki.equals(p11.publicKeySpkiDer), 'the public key read from the token');
      assert.ok(!key.description.includes(p11.token.pin), 'the description carries no PIN');
      await authority.registry.registerDevice(registeredBatch, { publicKeySpki: key.publicKeySpki }, 'test');
      const stateDir = join(tmp.path, 'state-p11');
      const info = await enrol({ server: server(), trust: rootPem, key, stateDir });
      assert.equal(info.authenticator, 'registered-key');
      assert.ok(info.channelBinding);
      opensslVerifies(info);

      // Re-enrolment: the token key authenticates the TLS connection (OpenSSL engine inside Node).
      for (const version of ['TLSv1.3', 'TLSv1.2'] as const) {
        const renewed = await reenrol({ server: server(), trust: rootPem, key, stateDir, minVersion: version, maxVersion: version });
        assert.equal(renewed.authenticator, 'current-certificate');
        assert.equal(renewed.tlsVersion, version);
        assert.equal(renewed.udid, info.udid);
        opensslVerifies(renewed);
      }

      // The CLI with the token key: the PIN from the environment, not the command line.
      const uriWithoutPin = p11.keyUri.replace(/;pin-value=[^;?]*/, '');
      const env = { ...p11.env, HALLMARK_PKCS11_PIN: p11.token.pin };
      const run = await cli(['agent', 'reenroll', '--server', server(), '--trust', t.rootPem, '--key', uriWithoutPin, '--pkcs11-module', p11.token.module, '--out', stateDir, '--json'], env);
      assert.equal(run.code, 0, run.stderr);
      assert.equal(JSON.parse(run.stdout).udid, info.udid);
      assert.ok(!run.stdout.includes(p11.token.pin) && !run.stderr.includes(p11.token.pin), 'no PIN printed');
    });
  });

  test('no claim secret, PIN or private key in the server log', () => {
    const all = logLines.join('');
    assert.ok(logLines.length > 5, 'requests were logged');
    for (const s of secrets) assert.ok(!all.includes(s), 'a secret was logged');
    assert.ok(!/PRIVATE KEY/.test(all));
  });
});

function encodeCert(der: Buffer): string {
  return new X509Certificate(der).toString();
}

let roots = 0;
/** A self-signed CA that has nothing to do with the server (openssl, before any request is in flight). */
function generateSelfSignedRoot(dir: string): string {
  const n = roots++;
  const out = join(dir, `other-root-${n}.pem`);
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, `other-root-${n}.key`), '-out', out, '-subj', '/CN=Some Other Root', '-days', '2', '-addext', 'basicConstraints=critical,CA:TRUE'], { stdio: 'pipe' });
  return out;
}
