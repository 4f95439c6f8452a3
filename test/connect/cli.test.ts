// `hallmark connect check` end to end: allowed (exit 0, permissions printed), JSON output, refused
// after a revocation and for a foreign self-signed certificate (exit 1), usage errors (exit 2).

import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, generateKeyPairSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Authority } from '../../src/authority/authority.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const ACTOR = 'cli:test';

let ta: TestAuthority;
let udid: string;
let serial: string;
let leafPem: string;
let bundlePem: string;
let derFile: string;

function hallmark(args: string[]): { code: number; stdout: string; stderr: string } {
  // No passphrase in the environment: connect check must not need one.
  const env = { ...process.env, HALLMARK_DATABASE_URL: '', HALLMARK_PASSPHRASE: '' };
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env, timeout: 60_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

before(async () => {
  ta = await createTestAuthority({ org: 'Acme' });
  const a = await Authority.open(ta.home, ta.passphrase);
  try {
    await a.registry.createProduct({ name: 'meter', actor: ACTOR });
    await a.registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: ACTOR });
    const batch = await a.registry.createBatch({ product: 'meter', line: 'line-a', quota: 5, actor: ACTOR });
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const spki = publicKey.export({ type: 'spki', format: 'der' });
    udid = createHash('sha256').update(spki).digest('hex');
    await a.registry.registerDevices(batch, [{ publicKeySpki: spki }], ACTOR);
    const csr = encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=x'), privateKey }));
    const issued = await a.issueForDevice({ udid, csr, actor: ACTOR });
    serial = issued.serial;
    leafPem = join(ta.dir, 'device.pem');
    writeFileSync(leafPem, encodePem('CERTIFICATE', issued.der));
    bundlePem = join(ta.dir, 'device-bundle.pem');
    writeFileSync(bundlePem, [issued.der, ...issued.chain].map((d) => encodePem('CERTIFICATE', d)).join(''));
    derFile = join(ta.dir, 'device.der');
    writeFileSync(derFile, issued.der);
  } finally {
    await a.close();
  }
});
after(async () => { await ta?.cleanup(); });

test('an allowed device: exit 0, decision, registry facts and permissions printed', () => {
  const r = hallmark(['connect', 'check', '--cert', leafPem, '--chain', ta.intermediatePem, '--home', ta.home]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /^ALLOWED OK: /);
  assert.match(r.stdout, new RegExp(`udid\\s+${udid}`));
  assert.match(r.stdout, /product\s+meter/);
  assert.match(r.stdout, /publish:\n\s+devices\/[0-9a-f]+\/#/);
  assert.ok(r.stdout.includes(`devices/${udid}/commands/#`));
  // A bundle (leaf + chain in one file) and raw DER work too.
  assert.equal(hallmark(['connect', 'check', '--cert', bundlePem, '--home', ta.home]).code, 0);
  assert.equal(hallmark(['connect', 'check', '--cert', derFile, '--home', ta.home]).code, 0);
});

test('--json prints the decision object', () => {
  const r = hallmark(['connect', 'check', '--cert', leafPem, '--json', '--home', ta.home]);
  assert.equal(r.code, 0, r.stderr);
  const d = JSON.parse(r.stdout) as { allowed: boolean; code: string; udid: string; serial: string; issuer: string; permissions: { publish: string[] } };
  assert.equal(d.allowed, true);
  assert.equal(d.code, 'OK');
  assert.equal(d.udid, udid);
  assert.equal(d.serial, serial);
  assert.equal(d.issuer, 'issuing-1');
  assert.deepEqual(d.permissions.publish, [`devices/${udid}/#`]);
});

test('expired at --at: exit 1', () => {
  const r = hallmark(['connect', 'check', '--cert', leafPem, '--at', '2200-01-01T00:00:00Z', '--home', ta.home]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  assert.match(r.stdout, /^REFUSED EXPIRED: /);
});

test('a foreign self-signed certificate and a wrong chain: exit 1', () => {
  const key = join(ta.dir, 'self.key');
  const cert = join(ta.dir, 'self.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-subj', '/CN=impostor', '-days', '1', '-out', cert], { stdio: 'pipe' });
  const r = hallmark(['connect', 'check', '--cert', cert, '--home', ta.home]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  assert.match(r.stdout, /^REFUSED UNKNOWN_CA: /);
  const chain = hallmark(['connect', 'check', '--cert', leafPem, '--chain', ta.rootPem, '--home', ta.home]);
  assert.equal(chain.code, 1);
  assert.match(chain.stdout, /^REFUSED BAD_CHAIN: /);
});

test('after a revocation: exit 1, REVOKED', () => {
  const r0 = spawnSync(process.execPath, [BIN, 'revoke', '--serial', serial, '--reason', 'keyCompromise', '--home', ta.home], { encoding: 'utf8', env: { ...process.env, HALLMARK_DATABASE_URL: '', HALLMARK_PASSPHRASE: ta.passphrase } });
  assert.equal(r0.status, 0, r0.stderr);
  const r = hallmark(['connect', 'check', '--cert', leafPem, '--json', '--home', ta.home]);
  assert.equal(r.code, 1);
  const d = JSON.parse(r.stdout) as { allowed: boolean; code: string };
  assert.equal(d.allowed, false);
  assert.equal(d.code, 'REVOKED');
});

test('usage: no --cert is exit 2; an unreadable file is a one-line error', () => {
  const r = hallmark(['connect', 'check', '--home', ta.home]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--cert is required/);
  const missing = hallmark(['connect', 'check', '--cert', join(ta.dir, 'nope.pem'), '--home', ta.home]);
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, /cannot read certificate file/);
  assert.equal(hallmark(['connect', 'check', '--help']).code, 0);
});
