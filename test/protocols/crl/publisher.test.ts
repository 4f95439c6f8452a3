// CrlPublisher on both dialects: numbering, full and delta contents, regeneration on revocation,
// schedule and size, other processes' revocations and CRLs, audit of every stored CRL.

import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../../src/audit/audit-log.js';
import { Authority } from '../../../src/authority/authority.js';
import { CrlPublisher } from '../../../src/authority/crl-publisher.js';
import { initAuthority } from '../../../src/authority/init.js';
import { revokeCertificates } from '../../../src/authority/revocation.js';
import { HallmarkError, type ErrorCode } from '../../../src/errors.js';
import { parseCertificate } from '../../../src/pki/certificate.js';
import { parseCrl, verifyCrlSignature } from '../../../src/protocols/crl/crl.js';
import { forEachDialect, withDatabaseUrl, type StoreTarget } from '../../helpers/db.js';
import { ACTOR, eventually, issueDevices } from './setup.js';
import { hasCode } from '../../helpers/assertions.js';

const PASSPHRASE = 'crl publisher test passphrase';


forEachDialect('CRL publisher', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir: join(target.dir, 'root'), org: 'CRL Org', passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const db = authority.store.db;
  let clock = Date.now();
  const publisher = new CrlPublisher(authority, { checkEveryMs: 0, publicUrl: 'http://pki.test/', now: () => new Date(clock), deltaMaxEntries: 5 });
  const issuing = parseCertificate((await authority.caChain('issuing-1', false))[0]!);
  const stored = () => db.selectFrom('crls').select(['number', 'kind', 'base_number', 'entries']).orderBy('number').execute();
  const serialsOf = (der: Buffer) => parseCrl(der).entries.map((e) => e.serialHex).sort();
  try {
    const { certs } = await issueDevices(authority, 9);
    const [a, b, c, d, e, f, g, h, i] = certs.map((x) => x.serial) as [string, string, string, string, string, string, string, string, string];

    await t.test('first use makes full CRL 1 (empty) and delta 2 on it; signed by the issuing CA, pointing to the delta', async () => {
      const full = await publisher.current('issuing-1', 'full');
      assert.deepEqual([full.number, full.kind, full.entries, full.baseNumber], [1, 'full', 0, null]);
      const parsed = parseCrl(full.der);
      assert.ok(parsed.issuer.equals(issuing.subject));
      assert.ok(verifyCrlSignature(parsed, issuing.subjectPublicKeyInfo));
      assert.deepEqual(parsed.freshestCrlUrls, ['http://pki.test/crl/issuing-1-delta.crl']);
      assert.equal(full.nextUpdate.getTime() - full.thisUpdate.getTime(), 7 * 86_400_000);
      const delta = await publisher.current('issuing-1', 'delta');
      assert.deepEqual([delta.number, delta.baseNumber, parseCrl(delta.der).deltaBase], [2, 1, 1]);
      assert.equal(delta.nextUpdate.getTime() - delta.thisUpdate.getTime(), 86_400_000);
      assert.equal((await publisher.current('issuing-1', 'full')).number, 1, 'still current: not made again');
      assert.deepEqual(await stored(), [{ number: 1, kind: 'full', base_number: null, entries: 0 }, { number: 2, kind: 'delta', base_number: 1, entries: 0 }]);
    });

    await t.test('a revocation regenerates the delta at once (debounced); the full CRL stays', async () => {
      await authority.revoke({ serial: a }, 'keyCompromise', ACTOR);
      const row = await eventually(async () => db.selectFrom('crls').selectAll().where('kind', '=', 'delta').where('number', '>', 2).executeTakeFirst());
      assert.equal(row.number, 3);
      const delta = parseCrl(Buffer.from(row.der));
      assert.deepEqual(delta.entries.map((x) => [x.serialHex, x.reason]), [[a, 'keyCompromise']]);
      assert.equal(delta.deltaBase, 1);
      assert.equal((await publisher.current('issuing-1', 'full')).number, 1);
      assert.equal((await publisher.current('issuing-1', 'delta')).number, 3);
    });

    await t.test('a batch revocation coalesces into one delta; current() never returns a delta missing a committed revocation', async () => {
      const before = (await stored()).length;
      await authority.revoke({ serial: b }, 'superseded', ACTOR);
      const delta = await publisher.current('issuing-1', 'delta'); // does not wait for the debounce
      assert.deepEqual(serialsOf(delta.der), [a, b].sort());
      await new Promise((r) => setTimeout(r, 100));
      assert.equal((await stored()).length, before + 1, 'the debounced regeneration found nothing left to do');
    });

    await t.test('regenerate(): a new full CRL with everything, and an empty delta on it', async () => {
      const { full, delta } = await publisher.regenerate('issuing-1');
      assert.deepEqual(serialsOf(full.der), [a, b].sort());
      assert.deepEqual(parseCrl(full.der).entries.find((x) => x.serialHex === a)?.reason, 'keyCompromise');
      assert.equal(delta.baseNumber, full.number);
      assert.equal(delta.number, full.number + 1);
      assert.deepEqual(serialsOf(delta.der), [], 'nothing revoked since the base');
    });

    await t.test('a delta that would outgrow deltaMaxEntries makes a new full CRL instead', async () => {
      const fullBefore = (await publisher.current('issuing-1', 'full')).number;
      await authority.revoke({ serial: c }, 'cessationOfOperation', ACTOR);
      await authority.revoke({ serial: d }, 'unspecified', ACTOR);
      let delta = await publisher.current('issuing-1', 'delta');
      assert.equal(delta.baseNumber, fullBefore);
      assert.deepEqual(serialsOf(delta.der), [c, d].sort());
      for (const s of [e, f, g, h]) await authority.revoke({ serial: s }, 'keyCompromise', ACTOR);
      delta = await publisher.current('issuing-1', 'delta');
      const full = await publisher.current('issuing-1', 'full');
      assert.ok(full.number > fullBefore, 'a new full CRL');
      assert.deepEqual(serialsOf(full.der), [a, b, c, d, e, f, g, h].sort());
      assert.equal(delta.baseNumber, full.number);
      assert.ok(delta.entries <= 5);
    });

    await t.test('schedule: a full CRL older than fullEveryMs, or a delta past half its validity, is made again', async () => {
      const full = await publisher.current('issuing-1', 'full');
      const delta = await publisher.current('issuing-1', 'delta');
      clock += 13 * 3_600_000; // delta half gone, full not yet due
      const delta2 = await publisher.current('issuing-1', 'delta');
      assert.ok(delta2.number > delta.number);
      assert.equal((await publisher.current('issuing-1', 'full')).number, full.number);
      clock += 12 * 3_600_000; // 25 h: the full is due
      const full2 = await publisher.current('issuing-1', 'full');
      assert.ok(full2.number > delta2.number);
      assert.equal((await publisher.current('issuing-1', 'delta')).baseNumber, full2.number);
    });

    await t.test('another process (its own publisher, no events) notices revocations and CRLs made elsewhere', async () => {
      const other = new CrlPublisher({ store: authority.store, directory: authority.directory, config: {}, events: new EventEmitter(), signingCa: (n) => authority.signingCa(n) }, { checkEveryMs: 0, now: () => new Date(clock) });
      clock = Date.now(); // back to real time: revoked_at is real time
      await publisher.regenerate('issuing-1');
      try {
        const mine = await publisher.current('issuing-1', 'delta');
        assert.equal((await other.current('issuing-1', 'delta')).number, mine.number, 'the stored delta is current: reused');
        await authority.revoke({ serial: i }, 'affiliationChanged', ACTOR);
        await eventually(async () => ((await publisher.current('issuing-1', 'delta')).entries === 1 ? true : undefined));
        await other.refreshAll(); // another number than the other process's state: reloads it
        const seen = await other.current('issuing-1', 'delta');
        assert.deepEqual(serialsOf(seen.der), [i]);
      } finally {
        await other.stop();
      }
      // A revocation no publisher heard of is found by the timer's check (refreshAll) and on loading.
      const quiet = new CrlPublisher({ store: authority.store, directory: authority.directory, config: {}, events: new EventEmitter(), signingCa: (n) => authority.signingCa(n) }, { checkEveryMs: 0, now: () => new Date(clock) });
      try {
        const { certs: [late] } = await issueDevices(authority, 1);
        const before = await quiet.current('issuing-1', 'delta');
        await revokeCertificates(authority.store, { serial: late!.serial }, 'keyCompromise', ACTOR);
        await quiet.refreshAll();
        const after = await quiet.current('issuing-1', 'delta');
        assert.ok(after.number > before.number);
        assert.ok(serialsOf(after.der).includes(late!.serial));
      } finally {
        await quiet.stop();
      }
    });

    await t.test('the root and unknown CAs get no CRL here', async () => {
      await assert.rejects(publisher.current(await authority.rootName(), 'full'), hasCode('NOT_FOUND'));
      await assert.rejects(publisher.current('no-such-ca', 'full'), hasCode('CA_NOT_FOUND'));
    });

    await t.test('every stored CRL has its crl.issue audit entry; the chain verifies', async () => {
      const rows = await db.selectFrom('crls').select(['number', 'kind', 'entries']).orderBy('number').execute();
      const audits = (await db.selectFrom('audit_log').select(['target', 'details']).where('action', '=', 'crl.issue').orderBy('seq').execute())
        .map((r) => ({ target: r.target, ...(JSON.parse(r.details) as { ca: string; number: number; kind: string; entries: number }) }));
      assert.deepEqual(audits.map((x) => [x.target, x.ca, x.number, x.kind, x.entries]), rows.map((r) => ['issuing-1', 'issuing-1', r.number, r.kind, r.entries]));
      assert.deepEqual(rows.map((r) => r.number), rows.map((_, k) => k + 1), 'one gap-free number sequence for full and delta');
      assert.equal((await verifyAuditLog(db)).ok, true);
    });
  } finally {
    await publisher.stop();
    await authority.close();
  }
});
