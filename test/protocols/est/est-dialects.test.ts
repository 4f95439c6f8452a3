// The EST enrolment path on both stores: its statements are hand-written SQL (src/store/raw-sql.ts),
// so SQLite and PostgreSQL are both exercised end to end over HTTPS: claims with first-use
// registration, registered keys, re-enrolment, a quota race through the group commit, approvals,
// revocation refusing re-enrolment.

import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../../src/audit/audit-log.js';
import { Authority } from '../../../src/authority/authority.js';
import { ROOT_FILES } from '../../../src/authority/home.js';
import { initAuthority } from '../../../src/authority/init.js';
import { decideApproval, listApprovals } from '../../../src/enrollment/approvals.js';
import { createClaim } from '../../../src/enrollment/claims.js';
import { createLogger } from '../../../src/log.js';
import { parseCertificate } from '../../../src/pki/certificate.js';
import { createCsr } from '../../../src/pki/csr.js';
import { encodeNameString } from '../../../src/pki/names.js';
import { encodePem } from '../../../src/pki/pem.js';
import { decodeCertsOnly } from '../../../src/protocols/est/wire.js';
import { udidOfKey } from '../../../src/registry/registry.js';
import { startServers } from '../../../src/server/servers.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../../helpers/db.js';
import { call, type Reply } from '../../helpers/http.js';

const PASSPHRASE = 'est dialects test passphrase';

interface Key { privateKey: KeyObject; spki: Buffer; udid: string; pem: string }
function newKey(): Key {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: udidOfKey(spki), pem: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string };
}
const csrB64 = (k: Key): string => createCsr({ subject: encodeNameString('CN=x'), privateKey: k.privateKey }).toString('base64');

forEachDialect('EST enrolment', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  const rootDir = join(target.dir, 'root');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: 'Acme', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'test' }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream) });
  const ca = readFileSync(join(rootDir, ROOT_FILES.certificate), 'utf8');
  const est = `${servers.httpsUrl}/.well-known/est`;
  const enroll = (body: string, o: { path?: string; claim?: string; cert?: string; key?: string } = {}): Promise<Reply> => call(`${est}/${o.path ?? 'simpleenroll'}`, {
    method: 'POST', rawBody: body, ca, cert: o.cert, key: o.key,
    headers: { 'content-type': 'application/pkcs10', ...(o.claim ? { authorization: `Basic ${Buffer.from(o.claim).toString('base64')}` } : {}) },
  });
  const certOf = (r: Reply): Buffer => {
    assert.equal(r.status, 200, r.body);
    return decodeCertsOnly(Buffer.from(r.body, 'base64'))[0]!;
  };
  const registry = authority.registry;
  await registry.createProduct({ name: 'meter', actor: 'test' });
  await registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: 'test' });
  try {
    await t.test('claim with first-use registration, then re-enrolment with the current certificate, then refusal once revoked', async () => {
      const batch = await registry.createBatch({ product: 'meter', line: 'line-a', quota: 10, allowUnregistered: true, actor: 'test' });
      const claim = await createClaim(authority.store, { batch, uses: 3, ttlMs: 3600e3, actor: 'test' });
      const k = newKey();
      const der = certOf(await enroll(csrB64(k), { claim: claim.basic }));
      assert.equal((await registry.device(k.udid)).batch, batch);
      assert.equal(Number((await authority.store.db.selectFrom('claims').select('used').where('id', '=', claim.id).executeTakeFirstOrThrow()).used), 1);
      const again = await enroll(csrB64(k), { claim: claim.basic });
      assert.equal(again.status, 403);
      const pem = encodePem('CERTIFICATE', der);
      const renewed = parseCertificate(certOf(await enroll(csrB64(k), { path: 'simplereenroll', cert: pem, key: k.pem })));
      assert.ok(renewed.subjectPublicKeyInfo.equals(k.spki));
      await authority.revoke({ serial: parseCertificate(der).serialHex.replace(/^00/, '') }, 'keyCompromise', 'test');
      assert.equal((await enroll(csrB64(k), { path: 'simplereenroll', cert: pem, key: k.pem })).status, 403);
    });

    await t.test('registered key; quota race of 12 for 4 through the group commit', async () => {
      const batch = await registry.createBatch({ product: 'meter', line: 'line-a', quota: 4, actor: 'test' });
      const keys = Array.from({ length: 12 }, () => newKey());
      await registry.registerDevices(batch, keys.map((k) => ({ publicKeySpki: k.spki })), 'test');
      const replies = await Promise.all(keys.map((k) => enroll(csrB64(k))));
      assert.equal(replies.filter((r) => r.status === 200).length, 4, replies.map((r) => r.status).join(','));
      assert.ok(replies.filter((r) => r.status !== 200).every((r) => r.status === 409));
      assert.equal((await registry.batch(batch)).issued, 4);
    });

    await t.test('approval: 202 until approved, then issued', async () => {
      const batch = await registry.createBatch({ product: 'meter', line: 'line-a', quota: 4, allowUnregistered: true, requireApproval: true, actor: 'test' });
      const claim = await createClaim(authority.store, { batch, uses: 3, ttlMs: 3600e3, actor: 'test' });
      const k = newKey();
      assert.equal((await enroll(csrB64(k), { claim: claim.basic })).status, 202);
      const [pending] = await listApprovals(authority.store, { batch, status: 'pending' });
      await decideApproval(authority.store, pending!.id, 'approve', 'test');
      certOf(await enroll(csrB64(k), { claim: claim.basic }));
      assert.equal((await verifyAuditLog(authority.store.db)).ok, true);
    });
  } finally {
    await servers.close();
    await authority.close();
  }
});
