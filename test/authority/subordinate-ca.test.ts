import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Authority } from '../../src/authority/authority.js';
import { OfflineRoot } from '../../src/authority/offline-root.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { createTestAuthority } from '../helpers/authority.js';

test('a line CA signed online by an intermediate whose path length allows it; refused under a pathLen-0 CA', async (t) => {
  const ta = await createTestAuthority({ org: 'Sub Org' });
  t.after(() => ta.cleanup());
  const authority = await Authority.open(ta.home, ta.passphrase);
  t.after(() => authority.close());

  await assert.rejects(authority.createSubordinateCa({ name: 'line-x', parent: 'issuing-1', actor: 'test' }), { code: 'CA_NOT_ACTIVE' });

  // A parent for lines, through the ceremony with --path-len 1.
  const { csrPem } = await authority.requestCa({ name: 'lines', actor: 'test' });
  const root = await OfflineRoot.open(ta.rootDir, ta.passphrase);
  const signed = await root.signIntermediate({ csr: csrPem, pathLen: 1 });
  await root.close();
  await authority.installCa({ certificate: signed.der, actor: 'test' });

  const ca = await authority.createSubordinateCa({ name: 'line-b', parent: 'lines', actor: 'test' });
  assert.equal(ca.parent, 'lines');
  assert.equal(ca.pathLen, 0);
  assert.equal(ca.status, 'active');
  await assert.rejects(authority.createSubordinateCa({ name: 'line-b', parent: 'lines', actor: 'test' }), { code: 'CA_EXISTS' });
  await assert.rejects(authority.createSubordinateCa({ name: 'deeper', parent: 'line-b', actor: 'test' }), { code: 'CA_NOT_ACTIVE' });

  // A device of a line under it gets a certificate that openssl verifies through root -> lines -> line-b.
  await authority.registry.createProduct({ name: 'meter', actor: 'test' });
  await authority.registry.createLine({ name: 'b', ca: 'line-b', actor: 'test' });
  const batch = await authority.registry.createBatch({ product: 'meter', line: 'b', quota: 1, actor: 'test' });
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const device = await authority.registry.registerDevice(batch, { publicKeySpki: publicKey.export({ type: 'spki', format: 'der' }) }, 'test');
  const cert = await authority.issueForDevice({ udid: device.udid, csr: createCsr({ subject: encodeNameString('CN=x'), privateKey }), actor: 'test' });
  assert.equal(cert.issuer, 'line-b');
  assert.equal(cert.chain.length, 3);
  const leaf = join(ta.dir, 'leaf.pem');
  const untrusted = join(ta.dir, 'untrusted.pem');
  writeFileSync(leaf, encodePem('CERTIFICATE', cert.der));
  writeFileSync(untrusted, cert.chain.slice(0, -1).map((d) => encodePem('CERTIFICATE', d)).join(''));
  const out = execFileSync('openssl', ['verify', '-x509_strict', '-CAfile', ta.rootPem, '-untrusted', untrusted, leaf], { encoding: 'utf8' });
  assert.match(out, /leaf\.pem: OK/);
});
