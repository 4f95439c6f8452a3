// The authority's own HTTPS certificate is renewed without downtime: `hallmark tls renew` in another
// process, picked up by the running server; `serve` renewing by itself near expiry; an interrupted
// renewal (chain and key out of step) reported by `tls status` and repaired by the server. Checked
// with openssl (the chain verifies against the root, the names are in the SAN) and with what a TLS
// client is actually served. During a root rollover: a certificate issued under the new root verifies
// for clients that pin the old root (the link certificates are served), and the device agent pinned to
// the old root enrols and re-enrols on a line of the new hierarchy.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect } from 'node:tls';
import { generateKeyPairSync } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { Authority } from '../../src/authority/authority.js';
import { renewServerTls, serverTls } from '../../src/authority/server-tls.js';
import { loadHomeConfig } from '../../src/authority/home.js';
import { OfflineRoot } from '../../src/authority/offline-root.js';
import { installRootRollover } from '../../src/authority/root-rollover.js';
import { createLogger } from '../../src/log.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { runWithInput } from '../helpers/http.js';
import { enrol, reenrol } from '../../src/agent/agent.js';
import { openDeviceKey } from '../../src/agent/device-key.js';
import { createClaim } from '../../src/enrollment/claims.js';

const run = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');

/** The certificate the server presents to a new TLS connection (serial, lower-case hex). */
function servedSerial(port: number, ca: string): Promise<{ serial: string; san: string }> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port, ca, servername: 'localhost' }, () => {
      const peer = socket.getPeerCertificate();
      socket.end();
      resolve({ serial: peer.serialNumber.toLowerCase(), san: peer.subjectaltname ?? '' });
    });
    socket.on('error', reject);
  });
}

describe('HTTPS certificate renewal', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let port: number;
  let root: string;
  const cli = (...args: string[]) => run(process.execPath, [BIN, ...args], { env: { ...process.env, HALLMARK_HOME: t.home, HALLMARK_PASSPHRASE: t.passphrase } });

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    const sink = { write: () => true } as unknown as NodeJS.WritableStream;
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(sink), tlsCheckMs: 3_600_000 });
    port = Number(new URL(servers.httpsUrl).port);
    root = readFileSync(t.rootPem, 'utf8');
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  test('hallmark tls renew in another process: new key and names; the running server serves it after its check', async () => {
    const before = await servedSerial(port, root);
    const status = JSON.parse((await cli('tls', 'status', '--json')).stdout) as { serial: string; daysLeft: number };
    assert.equal(status.serial, before.serial);
    assert.ok(status.daysLeft > 390, `${status.daysLeft} days left`);

    const renewed = JSON.parse((await cli('tls', 'renew', '--dns', 'localhost', '--dns', 'est.factory.example', '--ip', '127.0.0.1', '--json')).stdout) as { serial: string; dnsNames: string[] };
    assert.notEqual(renewed.serial, before.serial);
    assert.deepEqual(renewed.dnsNames, ['localhost', 'est.factory.example']);
    // openssl: the new chain verifies against the root, for serverAuth, and names the new host.
    const chainFile = join(t.home, 'tls', 'server.pem');
    const v = await run('openssl', ['verify', '-CAfile', t.rootPem, '-untrusted', chainFile, '-purpose', 'sslserver', chainFile]);
    assert.match(v.stdout, /OK/);
    const text = (await run('openssl', ['x509', '-in', chainFile, '-noout', '-ext', 'subjectAltName'])).stdout;
    assert.match(text, /DNS:est\.factory\.example/);

    // Until its check runs, the server keeps the old certificate; then new connections get the new one.
    assert.equal((await servedSerial(port, root)).serial, before.serial);
    await servers.tls.check();
    const after = await servedSerial(port, root);
    assert.equal(after.serial, renewed.serial);
    assert.match(after.san, /DNS:est\.factory\.example/);
    // One JSON entry per line.
    const entries = (await cli('audit', 'list', '--action', 'tls.renew', '--json')).stdout.trim().split('\n').map((l) => JSON.parse(l) as { action: string; target: string });
    assert.ok(entries.some((e) => e.action === 'tls.renew' && e.target === renewed.serial), 'the renewal is audited');
  });

  test('serve renews by itself when fewer than 30 days are left', async () => {
    const current = await serverTls(authority);
    await servers.tls.check(new Date(current.notAfter.getTime() - 40 * 86_400_000));
    assert.equal((await servedSerial(port, root)).serial, current.serial, '40 days left: kept');
    await servers.tls.check(new Date(current.notAfter.getTime() - 10 * 86_400_000));
    const renewed = await serverTls(authority);
    assert.notEqual(renewed.serial, current.serial);
    assert.equal((await servedSerial(port, root)).serial, renewed.serial);
    assert.deepEqual(renewed.dnsNames, current.dnsNames, 'the names are kept');
  });

  test('two renewals at once: one waits its turn (TLS_RENEWAL_IN_PROGRESS); a lock left by a dead process is taken over', async () => {
    const results = await Promise.allSettled([renewServerTls(authority, { actor: 'a' }), renewServerTls(authority, { actor: 'b' })]);
    assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
    const refused = results.find((r): r is PromiseRejectedResult => r.status === 'rejected')!;
    assert.equal((refused.reason as { code?: string }).code, 'TLS_RENEWAL_IN_PROGRESS');
    await serverTls(authority); // chain and key in step
    const lock = join(t.home, 'tls', 'renew.lock');
    writeFileSync(lock, '99999\n');
    await assert.rejects(cli('tls', 'renew'), (err: { stderr: string }) => /TLS_RENEWAL_IN_PROGRESS/.test(err.stderr));
    const old = new Date(Date.now() - 10 * 60_000);
    utimesSync(lock, old, old);
    const renewed = JSON.parse((await cli('tls', 'renew', '--json')).stdout) as { serial: string };
    assert.equal(existsSync(lock), false, 'the lock is gone after the renewal');
    authority.config.tls = (await loadHomeConfig(t.home)).tls;
    assert.equal((await serverTls(authority)).serial, renewed.serial);
  });

  test('an interrupted renewal (chain and key out of step) is reported, and the server repairs it', async () => {
    const good = readFileSync(join(t.home, 'tls', 'server.pem'), 'utf8');
    await cli('tls', 'renew');
    const chainFile = join(t.home, 'tls', 'server.pem');
    // As if the process died after writing the configuration but the chain file were the previous one.
    writeFileSync(chainFile, good);
    await assert.rejects(cli('tls', 'status'), (err: { stderr: string }) => /not for the configured TLS key.*hallmark tls renew/.test(err.stderr) && /CA_CERT_MISMATCH/.test(err.stderr));
    await servers.tls.check();
    const repaired = await serverTls(authority);
    assert.equal((await servedSerial(port, root)).serial, repaired.serial);
    assert.match((await cli('tls', 'status')).stdout, /days left/);
  });
});

describe('HTTPS certificate renewed during a root rollover', () => {
  test('issued under the new root, it still verifies for a device that pins the old root (NewWithOld is sent), and for one that pins the new root', async () => {
    const t = await createTestAuthority({ org: 'Acme' });
    let authority: Authority | undefined;
    let servers: RunningServers | undefined;
    try {
      const oldRootPem = readFileSync(t.rootPem, 'utf8');
      const root = await OfflineRoot.open(t.rootDir, t.passphrase);
      authority = await Authority.open(t.home, t.passphrase);
      try {
        await root.rollover();
        await installRootRollover({ store: authority.store, home: t.home, from: t.rootDir, actor: 'test' });
        const { csrPem } = await authority.requestCa({ name: 'issuing-2', actor: 'test' });
        await authority.installCa({ certificate: (await root.signIntermediate({ csr: csrPem })).der, actor: 'test' });
      } finally {
        await root.close();
      }
      const newRootPem = readFileSync(join(t.rootDir, 'root.pem'), 'utf8');
      assert.notEqual(newRootPem, oldRootPem);
      const renewed = await renewServerTls(authority, { ca: 'issuing-2', actor: 'test' });
      assert.match(renewed.issuer, /issuing-2/);
      const sink = { write: () => true } as unknown as NodeJS.WritableStream;
      servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(sink) });
      const port = Number(new URL(servers.httpsUrl).port);
      // Node's TLS client with only the old root as anchor, then only the new one.
      assert.equal((await servedSerial(port, oldRootPem)).serial, renewed.serial);
      assert.equal((await servedSerial(port, newRootPem)).serial, renewed.serial);
      // openssl with the old root only.
      const oldRootFile = join(t.dir, 'old-root.pem');
      writeFileSync(oldRootFile, oldRootPem);
      const r = await runWithInput('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, '-CAfile', oldRootFile, '-verify_return_error', '-servername', 'localhost'], 'Q\n');
      assert.match(r.stdout, /Verify return code: 0 \(ok\)/, r.stdout.slice(-600));

      // The device agent pinned to the old root enrols on a line of the new hierarchy and renews.
      await authority.registry.createProduct({ name: 'sensor', actor: 'test' });
      await authority.registry.createLine({ name: 'line-2', ca: 'issuing-2', actor: 'test' });
      const batch = await authority.registry.createBatch({ product: 'sensor', line: 'line-2', quota: 5, allowUnregistered: true, actor: 'test' });
      const claim = await createClaim(authority.store, { batch, uses: 1, ttlMs: 3_600_000, actor: 'test' });
      const keyFile = join(t.dir, 'device.key');
      writeFileSync(keyFile, generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
      const key = await openDeviceKey(keyFile);
      try {
        const stateDir = join(t.dir, 'device-state');
        const first = await enrol({ server: servers.httpsUrl, trust: oldRootPem, key, claim: claim.basic, stateDir });
        assert.match(first.issuer, /issuing-2/);
        // openssl, old root only: device certificate → issuing-2 → NewWithOld → old root, from what the agent stored.
        const verified = await run('openssl', ['verify', '-CAfile', oldRootFile, '-untrusted', join(stateDir, 'chain.pem'), join(stateDir, 'cert.pem')]);
        assert.match(verified.stdout, /OK/);
        const second = await reenrol({ server: servers.httpsUrl, trust: oldRootPem, key, stateDir });
        assert.notEqual(second.serial, first.serial);
        assert.equal(second.authenticator, 'current-certificate');
      } finally {
        await key.close();
      }
    } finally {
      await servers?.close();
      await authority?.close();
      await t.cleanup();
    }
  });
});
