// The connection decision with real certificates: allowed devices and their permissions; foreign CAs,
// expired, revoked, suspended and non-device certificates refused; the warm cache kept coherent by the
// 'revoked' events (same process, and another Authority on the same store with watchRevocations) and the
// audit tail (device state changes); malformed input refused cleanly; a real TLS socket.
// On SQLite and PostgreSQL.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { once } from 'node:events';
import type { TestContext } from 'node:test';
import { after } from 'node:test';
import * as tls from 'node:tls';
import { Authority } from '../../src/authority/authority.js';
import { initAuthority } from '../../src/authority/init.js';
import { ConnectionChecker, type Decision } from '../../src/connect/decision.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { makeTempDir } from '../helpers/tmp.js';

const PASSPHRASE = 'connect test passphrase';
const ACTOR = 'cli:test';

interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly udid: string }
function newKey(): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: createHash('sha256').update(spki).digest('hex') };
}
const csrOf = (key: DeviceKey, cn = 'x'): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString(`CN=${cn}`), privateKey: key.privateKey }));

/** Polls `fn` until it holds, for at most `ms`. */
async function eventually(ms: number, fn: () => Promise<boolean>, what: string): Promise<number> {
  const start = Date.now();
  for (;;) {
    if (await fn()) return Date.now() - start;
    if (Date.now() - start > ms) assert.fail(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A foreign authority (same organisation name, so the same CA names: only the signature tells them apart) with one device certificate. */
let foreign: Promise<{ ta: TestAuthority; leaf: Buffer; chain: readonly Buffer[] }> | undefined;
function foreignAuthority() {
  foreign ??= (async () => {
    const ta = await createTestAuthority({ org: 'Acme' });
    const a = await Authority.open(ta.home, ta.passphrase);
    try {
      await a.registry.createProduct({ name: 'meter', actor: ACTOR });
      await a.registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: ACTOR });
      const batch = await a.registry.createBatch({ product: 'meter', line: 'line-a', quota: 5, actor: ACTOR });
      const k = newKey();
      await a.registry.registerDevices(batch, [{ publicKeySpki: k.spki }], ACTOR);
      const issued = await a.issueForDevice({ udid: k.udid, csr: csrOf(k), actor: ACTOR });
      return { ta, leaf: issued.der, chain: issued.chain };
    } finally {
      await a.close();
    }
  })();
  return foreign;
}
after(async () => { if (foreign) await (await foreign).ta.cleanup(); });

forEachDialect('connection decision', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir: join(target.dir, 'root'), org: 'Acme', passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const registry = authority.registry;
  await registry.createProduct({ name: 'meter', actor: ACTOR });
  await registry.createProduct({ name: 'short', validityDays: 1, actor: ACTOR });
  await registry.createProduct({ name: 'lamp', actor: ACTOR });
  await authority.store.db.updateTable('products').set({ policy: JSON.stringify({ mqtt: { publish: ['lamps/{udid}/state', 'lamps/+/announce'], subscribe: ['lamps/{udid}/set', 'broadcast/#'] } }) }).where('name', '=', 'lamp').execute();
  await registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: ACTOR });
  const batches = new Map<string, string>();
  for (const p of ['meter', 'short', 'lamp']) batches.set(p, await registry.createBatch({ product: p, line: 'line-a', quota: 100, actor: ACTOR }));
  const device = async (product = 'meter') => {
    const key = newKey();
    await registry.registerDevices(batches.get(product)!, [{ publicKeySpki: key.spki, serialNumber: `SN-${key.udid.slice(0, 8)}` }], ACTOR);
    const issued = await authority.issueForDevice({ udid: key.udid, csr: csrOf(key), actor: ACTOR });
    return { key, udid: key.udid, serial: issued.serial, leaf: issued.der, chain: issued.chain, issued };
  };
  const [intermediate, root] = await authority.caChain('issuing-1');

  const checker = new ConnectionChecker(authority);
  await checker.start();
  try {
    await t.test('an active device is allowed, with its registry facts and the default permissions; the second check is warm', async () => {
      const d = await device();
      const cold = await checker.check([d.leaf]);
      assert.equal(cold.code, 'OK', cold.reason);
      assert.equal(cold.allowed, true);
      assert.equal(cold.udid, d.udid);
      assert.equal(cold.tenant, 'default');
      assert.equal(cold.product, 'meter');
      assert.equal(cold.line, 'line-a');
      assert.equal(cold.batch, batches.get('meter'));
      assert.equal(cold.serial, d.serial);
      assert.equal(cold.issuer, 'issuing-1');
      assert.deepEqual(cold.permissions, { publish: [`devices/${d.udid}/#`], subscribe: [`devices/${d.udid}/commands/#`] });
      const warmBefore = checker.stats.warm;
      const warm = await checker.check([d.leaf]);
      assert.equal(checker.stats.warm, warmBefore + 1);
      assert.equal(warm, cold, 'the warm answer is the memoised decision');
      assert.equal(checker.checkCached([d.leaf]), cold);
      // With the chain as presented in TLS: intermediate, and intermediate + root.
      assert.equal((await checker.check([d.leaf, intermediate!])).code, 'OK');
      assert.equal((await checker.check([d.leaf, intermediate!, root!])).code, 'OK');
      // A fresh checker (cold, with the chain) decides the same.
      const fresh = new ConnectionChecker({ store: authority.store });
      assert.equal((await fresh.check([d.leaf, intermediate!, root!])).code, 'OK');
      await fresh.close();
    });

    await t.test('a forged certificate that ends like a cached one (same signature bytes) is not taken for it', async () => {
      const d = await device();
      assert.equal((await checker.check([d.leaf])).code, 'OK');
      // Change one byte of the subject: the DER keeps the cached certificate's length and last bytes.
      const forged = Buffer.from(d.leaf);
      forged[forged.length - 120]! ^= 0x01;
      assert.equal(checker.checkCached([forged]), undefined, 'not a warm hit');
      const r = await checker.check([forged]);
      assert.equal(r.allowed, false, r.reason);
    });

    await t.test("a product's policy gives the device's permissions ({udid} filled in)", async () => {
      const d = await device('lamp');
      const r = await checker.check([d.leaf]);
      assert.equal(r.code, 'OK', r.reason);
      assert.deepEqual(r.permissions, { publish: [`lamps/${d.udid}/state`, 'lamps/+/announce'], subscribe: [`lamps/${d.udid}/set`, 'broadcast/#'] });
    });

    await t.test('a certificate of a foreign CA is refused: self-signed by openssl, and another authority with the same CA names', async () => {
      const dir = await makeTempDir('hallmark-connect-');
      try {
        execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir.path, 'k.pem'),
          '-subj', '/CN=impostor/O=Acme', '-days', '1', '-outform', 'DER', '-out', join(dir.path, 'c.der')], { stdio: 'pipe' });
        const selfSigned = readFileSync(join(dir.path, 'c.der'));
        const r = await checker.check([selfSigned]);
        assert.equal(r.allowed, false);
        assert.equal(r.code, 'UNKNOWN_CA', r.reason);
      } finally {
        await dir.cleanup();
      }
      const other = await foreignAuthority();
      assert.ok(other.chain[0]!.subarray(0, 10).length > 0);
      const r1 = await checker.check([other.leaf]);
      assert.equal(r1.code, 'UNKNOWN_CA', r1.reason);
      const r2 = await checker.check([other.leaf, ...other.chain]);
      assert.equal(r2.code, 'UNKNOWN_CA', r2.reason);
      assert.equal(checker.size > 0, true);
    });

    await t.test('validity is evaluated at check time: expired and not yet valid refused, also from the warm cache', async () => {
      const d = await device('short');
      assert.equal((await checker.check([d.leaf])).code, 'OK');
      const later = new Date(d.issued.notAfter.getTime() + 1000);
      const r = await checker.check([d.leaf], later);
      assert.equal(r.code, 'EXPIRED', r.reason);
      assert.equal(r.allowed, false);
      assert.equal((await checker.check([d.leaf], new Date(d.issued.notBefore.getTime() - 60_000))).code, 'NOT_YET_VALID');
      // Far in the future the CA has expired too; the certificate's own end is reported first.
      assert.equal((await checker.check([d.leaf], new Date('2100-01-01T00:00:00Z'))).code, 'EXPIRED');
      // Cold with an `at` in the future.
      const cold = new ConnectionChecker({ store: authority.store });
      assert.equal((await cold.check([d.leaf], later)).code, 'EXPIRED');
      await cold.close();
    });

    await t.test('a revocation in this process flips a warm entry at once', async () => {
      const d = await device();
      assert.equal((await checker.check([d.leaf])).code, 'OK');
      await authority.revoke({ serial: d.serial }, 'keyCompromise', ACTOR);
      const r = await checker.check([d.leaf]);
      assert.equal(r.code, 'REVOKED', r.reason);
      assert.match(r.reason, /keyCompromise/);
      // Cold: read from the certificates table.
      const cold = new ConnectionChecker({ store: authority.store });
      assert.equal((await cold.check([d.leaf])).code, 'REVOKED');
      await cold.close();
    });

    const second = await Authority.open(home, PASSPHRASE, await target.openStore());
    const stopWatching = authority.watchRevocations(200);
    try {
      await t.test('a revocation by another Authority on the same store reaches a warm entry within about a second', async () => {
        const d = await device();
        assert.equal((await checker.check([d.leaf])).code, 'OK');
        const eventsBefore = checker.stats.revocationEvents;
        await second.revoke({ serial: d.serial }, 'superseded', ACTOR);
        const ms = await eventually(1500, async () => (await checker.check([d.leaf])).code === 'REVOKED', 'revocation by another instance');
        assert.ok(ms < 1500);
        await eventually(1500, async () => checker.stats.revocationEvents > eventsBefore, 'the watcher announces it');
      });

      await t.test('suspended refused, resumed allowed again (audit tail); revoked and decommissioned devices refused', async () => {
        const d = await device();
        assert.equal((await checker.check([d.leaf])).code, 'OK');
        await second.registry.changeState(d.udid, 'suspend', ACTOR);
        await eventually(1500, async () => (await checker.check([d.leaf])).code === 'DEVICE_SUSPENDED', 'suspension');
        const suspended = await checker.check([d.leaf]);
        assert.equal(suspended.allowed, false);
        assert.equal(suspended.udid, d.udid);
        await second.registry.changeState(d.udid, 'resume', ACTOR);
        await eventually(1500, async () => (await checker.check([d.leaf])).code === 'OK', 'resumption');

        await registry.transfer(d.udid, 'customer-b', ACTOR);
        await eventually(1500, async () => (await checker.check([d.leaf])).tenant === 'customer-b', 'transfer');

        await second.registry.changeState(d.udid, 'revoke', ACTOR);
        await eventually(1500, async () => ['DEVICE_REVOKED', 'REVOKED'].includes((await checker.check([d.leaf])).code), 'device revocation');
        const e = await device();
        assert.equal((await checker.check([e.leaf])).code, 'OK');
        await second.registry.changeState(e.udid, 'decommission', ACTOR);
        await eventually(1500, async () => ['DEVICE_DECOMMISSIONED', 'REVOKED'].includes((await checker.check([e.leaf])).code), 'decommission');
        // Cold, the device state decides (its certificates were revoked with it, the certificate status says so first).
        const cold = new ConnectionChecker({ store: authority.store });
        assert.equal((await cold.check([e.leaf])).allowed, false);
        await cold.close();
      });

      await t.test('a suspension read cold (not cached before) is refused, with the device named', async () => {
        const d = await device();
        await registry.changeState(d.udid, 'suspend', ACTOR);
        const r = await checker.check([d.leaf]);
        assert.equal(r.code, 'DEVICE_SUSPENDED');
        assert.equal(r.product, 'meter');
      });
    } finally {
      stopWatching();
      await second.close();
    }

    await t.test('certificates that do not identify a registry device are refused', async () => {
      const k = newKey();
      const operator = await authority.issue({ csr: csrOf(k, 'operator-made'), profile: 'device', subject: 'CN=operator-made,O=Acme', actor: ACTOR });
      const r1 = await checker.check([operator.der]);
      assert.equal(r1.code, 'UNKNOWN_DEVICE', r1.reason);
      const server = await authority.issue({ csr: csrOf(newKey(), 'svc'), profile: 'tls-server', subject: 'CN=svc.acme.test', altNames: { dns: ['svc.acme.test'] }, actor: ACTOR });
      const r2 = await checker.check([server.der]);
      assert.equal(r2.code, 'NOT_A_DEVICE_CERTIFICATE', r2.reason);
      assert.equal(r2.allowed, false);
    });

    await t.test('malformed input is refused cleanly: garbage, too many or too large certificates, a broken chain', async () => {
      const d = await device();
      const cases: [string, Buffer[], Decision['code']][] = [
        ['empty chain', [], 'MALFORMED'],
        ['garbage', [Buffer.from('not a certificate at all')], 'MALFORMED'],
        ['truncated', [d.leaf.subarray(0, d.leaf.length - 10)], 'MALFORMED'],
        ['empty buffer', [Buffer.alloc(0)], 'MALFORMED'],
        ['nine certificates', Array.from({ length: 9 }, () => d.leaf), 'MALFORMED'],
        ['a 70 KiB certificate', [Buffer.alloc(70 * 1024, 0x30)], 'MALFORMED'],
        ['garbage after the leaf', [d.leaf, Buffer.from([0x30, 0x03, 0x01, 0x01, 0xff])], 'MALFORMED'],
      ];
      for (const [what, chain, code] of cases) {
        const r = await checker.check(chain);
        assert.equal(r.code, code, `${what}: ${r.reason}`);
        assert.equal(r.allowed, false, what);
      }
      const other = await foreignAuthority();
      // Cold and then warm: a wrong intermediate (the foreign authority's, same name) and a skipped intermediate.
      const fresh = new ConnectionChecker({ store: authority.store });
      for (const c of [fresh, checker]) {
        assert.equal((await c.check([d.leaf, other.chain[0]!])).code, 'BAD_CHAIN');
        assert.equal((await c.check([d.leaf, root!])).code, 'BAD_CHAIN');
        assert.equal((await c.check([d.leaf, intermediate!, intermediate!])).code, 'BAD_CHAIN');
        assert.equal((await c.check([d.leaf, intermediate!])).code, 'OK');
      }
      await fresh.close();
      // @ts-expect-error: not an array
      assert.equal((await checker.check(undefined)).code, 'MALFORMED');
    });

    await t.test('checkTlsSocket decides from the peer chain of a mutual-TLS connection', async () => {
      const d = await device();
      const server = await authority.issue({ csr: csrOf(newKey(), 'svc'), profile: 'tls-server', subject: 'CN=localhost', altNames: { dns: ['localhost'] }, actor: ACTOR });
      // The server key: issue for a key we hold.
      const serverKey = newKey();
      const serverCert = await authority.issue({ csr: csrOf(serverKey, 'localhost'), profile: 'tls-server', subject: 'CN=localhost', altNames: { dns: ['localhost'] }, actor: ACTOR });
      assert.ok(server.der.length > 0);
      const pem = (ders: readonly Buffer[]) => ders.map((x) => encodePem('CERTIFICATE', x)).join('');
      const decisions: Decision[] = [];
      const srv = tls.createServer({
        key: serverKey.privateKey.export({ type: 'pkcs8', format: 'pem' }), cert: pem([serverCert.der, intermediate!]),
        ca: pem([root!]), requestCert: true, rejectUnauthorized: false,
      }, (socket) => {
        void checker.checkTlsSocket(socket).then((r) => { decisions.push(r); socket.end(); });
      });
      srv.listen(0, '127.0.0.1');
      await once(srv, 'listening');
      const port = (srv.address() as { port: number }).port;
      try {
        const connect = async (opts: tls.ConnectionOptions) => {
          const s = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', ca: pem([root!]), ...opts });
          s.on('error', () => {});
          await once(s, 'close');
        };
        await connect({ key: d.key.privateKey.export({ type: 'pkcs8', format: 'pem' }), cert: pem([d.leaf, intermediate!]) });
        await connect({});
        await eventually(3000, async () => decisions.length === 2, 'both connections decided');
        assert.equal(decisions[0]!.code, 'OK', decisions[0]!.reason);
        assert.equal(decisions[0]!.udid, d.udid);
        assert.equal(decisions[1]!.code, 'MALFORMED');
      } finally {
        srv.close();
      }
    });
  } finally {
    await checker.close();
    await authority.close();
  }
});
