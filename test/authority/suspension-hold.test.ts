// A suspended device's certificates are on hold (RFC 5280 §5.3.1 certificateHold) in its issuer's CRLs
// and OCSP answers, and come off hold when the device is resumed: full CRL (certificateHold entry, gone
// after the resumption), delta CRL (certificateHold since its base; removeFromCRL for a hold on its base
// that ended), a publisher started later (another process) finding the same, `openssl crl -text`, and the
// OCSP responder (revoked / certificateHold, good again; its cache dropped by its poll of the audit log).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { Authority } from '../../src/authority/authority.js';
import { CrlPublisher } from '../../src/authority/crl-publisher.js';
import { initAuthority } from '../../src/authority/init.js';
import { encodePem } from '../../src/pki/pem.js';
import { parseCrl } from '../../src/protocols/crl/crl.js';
import { certIdFor, encodeOcspRequest, parseOcspResponse } from '../../src/protocols/ocsp/ocsp.js';
import { OcspResponder } from '../../src/protocols/ocsp/responder.js';
import { forEachDialect, withDatabaseUrl, type StoreTarget } from '../helpers/db.js';
import { ACTOR, issueDevices } from '../protocols/crl/setup.js';

const PASSPHRASE = 'suspension hold test passphrase';

const hasOpenssl = (() => { try { execFileSync('openssl', ['version']); return true; } catch { return false; } })();

forEachDialect('suspension puts certificates on hold (CRL certificateHold, OCSP)', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir: join(target.dir, 'root'), org: 'Hold Org', passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const db = authority.store.db;
  const publisher = new CrlPublisher(authority, { checkEveryMs: 0 });
  const responder = new OcspResponder(authority, { pollIntervalMs: 0, refreshIntervalMs: 0 });
  const issuing = (await authority.caChain('issuing-1', false))[0]!;
  const entriesOf = (der: Buffer) => parseCrl(der).entries.map((e) => [e.serialHex, e.reason]).sort();
  const udidOf = async (serial: string) => (await db.selectFrom('certificates').select('device_udid').where('serial', '=', serial).executeTakeFirstOrThrow()).device_udid!;
  const ocsp = async (serial: string) => {
    const answer = await responder.respond(encodeOcspRequest([certIdFor(issuing, serial)]));
    return { ...parseOcspResponse(answer.der).basic!.responses[0]!, fromCache: answer.fromCache };
  };
  try {
    const { certs } = await issueDevices(authority, 3);
    const [a, b, c] = certs.map((x) => x.serial) as [string, string, string];
    const udidA = await udidOf(a);
    await publisher.current('issuing-1', 'delta');
    assert.equal((await ocsp(a)).status, 'good');
    assert.equal((await ocsp(a)).fromCache, true);

    await t.test('suspend: the delta lists the hold (certificateHold, dated at the suspension); a new full CRL too, beside revocations', async () => {
      await authority.revoke({ serial: b }, 'keyCompromise', ACTOR);
      await authority.registry.changeState(udidA, 'suspend', ACTOR);
      const suspendedAt = new Date((await db.selectFrom('devices').select('updated_at').where('udid', '=', udidA).executeTakeFirstOrThrow()).updated_at);
      const delta = await publisher.current('issuing-1', 'delta', { recheck: true });
      assert.deepEqual(entriesOf(delta.der), [[a, 'certificateHold'], [b, 'keyCompromise']].sort());
      assert.equal(parseCrl(delta.der).entries.find((e) => e.serialHex === a)!.revokedAt.getTime(), Math.floor(suspendedAt.getTime() / 1000) * 1000);
      const { full, delta: empty } = await publisher.regenerate('issuing-1');
      assert.deepEqual(entriesOf(full.der), [[a, 'certificateHold'], [b, 'keyCompromise']].sort());
      assert.equal(full.entries, 2);
      assert.deepEqual(entriesOf(empty.der), [], 'nothing changed since the new base');
      assert.equal((await publisher.current('issuing-1', 'delta', { recheck: true })).number, empty.number, 'no change: not made again');
      if (hasOpenssl) {
        const file = join(target.dir, 'hold.crl.pem');
        writeFileSync(file, encodePem('X509 CRL', full.der));
        const text = execFileSync('openssl', ['crl', '-in', file, '-noout', '-text'], { encoding: 'utf8' });
        assert.match(text, new RegExp(`Serial Number: 0*${a.toUpperCase()}[\\s\\S]*?CRL Reason Code:\\s*Certificate Hold`, 'i'));
        assert.match(text, /Key Compromise/);
      }
    });

    await t.test('a publisher that starts later (another process) finds the stored delta current', async () => {
      const other = new CrlPublisher(authority, { checkEveryMs: 0 });
      try {
        const before = (await publisher.current('issuing-1', 'delta')).number;
        assert.equal((await other.current('issuing-1', 'delta')).number, before);
      } finally { await other.stop(); }
    });

    await t.test('OCSP: revoked with reason certificateHold once the poll has seen the suspension', async () => {
      const cached = await ocsp(a);
      assert.equal(cached.status, 'good', 'the cached answer, until the poll');
      await responder.pollRevocations();
      const r = await ocsp(a);
      assert.equal(r.status, 'revoked');
      assert.equal(r.revocationReason, 6);
      assert.equal(r.fromCache, false);
      assert.deepEqual(await responder.statusOf('issuing-1', c), { kind: 'good' });
    });

    await t.test('resume: the delta lists removeFromCRL, the next full CRL no longer lists it; OCSP good again', async () => {
      await authority.registry.changeState(udidA, 'resume', ACTOR);
      const delta = await publisher.current('issuing-1', 'delta', { recheck: true });
      assert.deepEqual(entriesOf(delta.der), [[a, 'removeFromCRL']]);
      const other = new CrlPublisher(authority, { checkEveryMs: 0 });
      try {
        assert.equal((await other.current('issuing-1', 'delta')).number, delta.number, 'a publisher started later agrees');
      } finally { await other.stop(); }
      const { full } = await publisher.regenerate('issuing-1');
      assert.deepEqual(entriesOf(full.der), [[b, 'keyCompromise']]);
      await responder.pollRevocations();
      assert.equal((await ocsp(a)).status, 'good');
    });

    await t.test('a device on hold whose certificate is then revoked: listed as revoked, not as a hold', async () => {
      await authority.registry.changeState(udidA, 'suspend', ACTOR);
      const { full } = await publisher.regenerate('issuing-1');
      assert.deepEqual(entriesOf(full.der), [[a, 'certificateHold'], [b, 'keyCompromise']].sort());
      await authority.revoke({ serial: a }, 'superseded', ACTOR);
      const delta = await publisher.current('issuing-1', 'delta', { recheck: true });
      assert.deepEqual(entriesOf(delta.der), [[a, 'superseded']]);
      assert.equal((await responder.statusOf('issuing-1', a)).kind, 'revoked');
      assert.equal((await ocsp(a)).revocationReason, 4);
    });
  } finally {
    responder.close();
    await publisher.stop();
    await authority.close();
  }
});
