// Delegated OCSP signers (src/authority/ocsp-signers.ts): found, created on demand, renewed near expiry.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Authority } from '../../../src/authority/authority.js';
import { loadHomeConfig } from '../../../src/authority/home.js';
import { OfflineRoot } from '../../../src/authority/offline-root.js';
import { needsRenewal, ocspSignerFor, RENEW_WITHIN_DAYS } from '../../../src/authority/ocsp-signers.js';
import { parseCertificate } from '../../../src/pki/certificate.js';
import { EKU, EXT, decodeOidSequence } from '../../../src/pki/extensions.js';
import { verifyIssuedBy } from '../../../src/pki/verify.js';
import { createTestAuthority, type TestAuthority } from '../../helpers/authority.js';

const DAY = 86_400_000;

describe('OCSP signers', () => {
  let t: TestAuthority;
  let authority: Authority;

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
  });

  after(async () => {
    await authority?.close();
    await t?.cleanup();
  });

  const signerCertificates = async (): Promise<number> =>
    (await authority.store.db.selectFrom('certificates').select('id').where('profile', '=', 'ocsp-signer').execute()).length;

  test('the signer init made is found, not replaced', async () => {
    const configured = authority.config.ocspSigners['issuing-1']!;
    const before = await signerCertificates();
    const s = await ocspSignerFor(authority, 'issuing-1');
    assert.equal(s.created, false);
    assert.equal(s.serial, configured.serial);
    assert.ok(s.signer.publicKeySpki.equals(s.parsed.subjectPublicKeyInfo));
    assert.equal(await signerCertificates(), before);
  });

  test('a CA without one gets one on first use (once, even when asked concurrently), saved in the configuration', async () => {
    const { csrPem } = await authority.requestCa({ name: 'line-c', actor: 'test' });
    const root = await OfflineRoot.open(t.rootDir, t.passphrase);
    const signed = await root.signIntermediate({ csr: csrPem, pathLen: 0 });
    await root.close();
    await authority.installCa({ certificate: signed.der, actor: 'test' });
    const before = await signerCertificates();
    const [a, b] = await Promise.all([ocspSignerFor(authority, 'line-c', { actor: 'tester' }), ocspSignerFor(authority, 'line-c')]);
    assert.equal(a.serial, b.serial);
    assert.equal(a.created, true);
    assert.equal(await signerCertificates(), before + 1);
    // id-kp-OCSPSigning, id-pkix-ocsp-nocheck, issued by line-c.
    const cert = a.parsed;
    verifyIssuedBy(cert, parseCertificate(signed.der));
    assert.deepEqual(decodeOidSequence(cert.extensions.get(EXT.extKeyUsage)!.value, 'eku'), [EKU.ocspSigning]);
    assert.ok(cert.extensions.has(EXT.ocspNoCheck));
    const saved = (await loadHomeConfig(t.home)).ocspSigners['line-c'];
    assert.equal(saved?.serial, a.serial);
    // The issuance is audited under the actor given.
    const audit = await authority.store.db.selectFrom('audit_log').select(['actor', 'target']).where('action', '=', 'certificate.issue').where('target', '=', a.serial).executeTakeFirstOrThrow();
    assert.equal(audit.actor, 'tester');
    // Next time it is found.
    assert.equal((await ocspSignerFor(authority, 'line-c')).created, false);
  });

  test(`renewed (new key, new certificate) within ${RENEW_WITHIN_DAYS} days of expiry`, async () => {
    const current = await ocspSignerFor(authority, 'issuing-1');
    const renewed = await ocspSignerFor(authority, 'issuing-1', { now: new Date(current.notAfter.getTime() - 10 * DAY) });
    assert.equal(renewed.created, true);
    assert.notEqual(renewed.serial, current.serial);
    assert.ok(!renewed.signer.publicKeySpki.equals(current.signer.publicKeySpki));
    assert.equal((await loadHomeConfig(t.home)).ocspSigners['issuing-1']!.serial, renewed.serial);
    assert.equal((await ocspSignerFor(authority, 'issuing-1')).serial, renewed.serial);
  });

  test('needsRenewal: expiring soon, unless the CA ends first', () => {
    const now = new Date('2030-01-01T00:00:00Z');
    const at = (days: number) => new Date(now.getTime() + days * DAY);
    assert.equal(needsRenewal(at(200), at(3000), now), false);
    assert.equal(needsRenewal(at(29), at(3000), now), true);
    assert.equal(needsRenewal(at(-1), at(3000), now), true);
    assert.equal(needsRenewal(at(20), at(20), now), false, 'a new one would end with the CA anyway');
    assert.equal(needsRenewal(at(20), at(20.5), now), false);
    assert.equal(needsRenewal(at(20), at(25), now), true);
  });

  test('the offline root has no online signer', async () => {
    await assert.rejects(ocspSignerFor(authority, await authority.rootName()), { code: 'CA_NOT_ACTIVE' });
    await assert.rejects(ocspSignerFor(authority, 'no-such-ca'), { code: 'CA_NOT_FOUND' });
  });
});
