// Shared set-up for the CRL tests (no tests here): device certificates issued through the registry.

import { createHash, generateKeyPairSync } from 'node:crypto';
import type { Authority, IssuedCertificate } from '../../../src/authority/authority.js';
import { createCsr } from '../../../src/pki/csr.js';
import { encodeNameString } from '../../../src/pki/names.js';

export const ACTOR = 'test';

let lines = 0;

/** A product (once), a line on issuing-1 and a batch of `n` registered devices, each issued a certificate. */
export async function issueDevices(authority: Authority, n: number): Promise<{ batch: string; certs: IssuedCertificate[] }> {
  const registry = authority.registry;
  if (!(await authority.store.db.selectFrom('products').select('id').where('name', '=', 'crl-meter').executeTakeFirst())) {
    await registry.createProduct({ name: 'crl-meter', actor: ACTOR });
  }
  const line = `crl-line-${++lines}-${Date.now().toString(36)}`;
  await registry.createLine({ name: line, ca: 'issuing-1', actor: ACTOR });
  const batch = await registry.createBatch({ product: 'crl-meter', line, quota: n, actor: ACTOR });
  const keys = Array.from({ length: n }, () => generateKeyPairSync('ec', { namedCurve: 'P-256' }));
  const spkis = keys.map((k) => k.publicKey.export({ type: 'spki', format: 'der' }));
  await registry.registerDevices(batch, spkis.map((publicKeySpki) => ({ publicKeySpki })), ACTOR);
  const certs: IssuedCertificate[] = [];
  for (let i = 0; i < n; i++) {
    const udid = createHash('sha256').update(spkis[i]!).digest('hex');
    certs.push(await authority.issueForDevice({ udid, csr: createCsr({ subject: encodeNameString('CN=device'), privateKey: keys[i]!.privateKey }), actor: ACTOR }));
  }
  return { batch, certs };
}

/** Polls `check` until it returns a value (not undefined) or `ms` pass. */
export async function eventually<T>(check: () => Promise<T | undefined>, ms = 3000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}
