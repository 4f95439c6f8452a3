// Root rollover and the root's revocation of an intermediate, through the hallmark CLI, checked with
// openssl alone: the link certificates, the chains a relying party can build during the rollover, EST
// cacerts over HTTPS (curl + openssl pkcs7), the root CRL (openssl crl, openssl verify -crl_check).
// With file-backend roots and, when SoftHSM2 is there, a root key in a PKCS#11 token.
//
// Which chains work after a rollover (R1 = old root, R2 = new root, I1 = issuing-1 signed by R1):
//   trusts R1 only:  device(I1) -> I1 -> R1                                   OK (nothing changed)
//                    device(I2) -> I2 -> NewWithOld -> R1                      OK (I2 signed by R2 after the rollover)
//   trusts R2 only:  device(I1) -> I1 -> OldWithNew -> R2                      OK
//                    device(I1) -> I1 (without OldWithNew)                     fails: no path to R2
//                    device(I2) -> I2 -> R2                                    OK

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Authority } from '../../src/authority/authority.js';
import { createLogger } from '../../src/log.js';
import { parseCertificate } from '../../src/pki/certificate.js';
import { nameToString } from '../../src/pki/names.js';
import { decodePemBlocks } from '../../src/pki/pem.js';
import { decodeCertsOnly } from '../../src/protocols/est/wire.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { createSoftHsmToken, softHsmAvailable, type SoftHsmToken } from '../helpers/softhsm.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const run = promisify(execFile);

function cli(env: Record<string, string | undefined>) {
  return (args: string[]) => {
    const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 60_000 });
    assert.equal(r.status, 0, `hallmark ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };
}

function verify(args: string[]): { ok: boolean; out: string } {
  const r = spawnSync('openssl', ['verify', ...args], { encoding: 'utf8' });
  return { ok: r.status === 0, out: `${r.stdout}${r.stderr}` };
}

const newCsr = (dir: string, name: string): string => {
  const csr = join(dir, `${name}.csr`);
  execFileSync('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, `${name}.key`), '-subj', `/CN=${name}`, '-out', csr], { stdio: 'ignore' });
  return csr;
};

describe('root rollover and root revocation with openssl (file-backend root)', () => {
  let t: TestAuthority;
  let dir: string;
  let ok: (args: string[]) => string;
  let oldRoot: string;
  let newRoot: string;
  let newWithOld: string;
  let oldWithNew: string;
  let device1: string;

  before(async () => {
    t = await createTestAuthority({ org: 'Interop Org' });
    dir = t.dir;
    ok = cli({ HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' });
    device1 = join(dir, 'device-1.pem');
    ok(['issue', '--home', t.home, '--csr', newCsr(dir, 'device-1'), '--subject', 'CN=device-1', '--out', device1]);
    ok(['root', 'rollover', '--root-dir', t.rootDir, '--validity', '25y']);
    oldRoot = join(t.rootDir, 'root-1.pem');
    newRoot = join(t.rootDir, 'root-2.pem');
    newWithOld = join(t.rootDir, 'root-2-newwithold.pem');
    oldWithNew = join(t.rootDir, 'root-2-oldwithnew.pem');
  });

  after(async () => {
    await t?.cleanup();
  });

  test('the link certificates verify: NewWithOld under the old root, OldWithNew under the new root', () => {
    assert.equal(readFileSync(oldRoot, 'utf8'), readFileSync(t.rootPem, 'utf8'));
    assert.equal(readFileSync(newRoot, 'utf8'), readFileSync(join(t.rootDir, 'root.pem'), 'utf8'));
    const nwo = verify(['-check_ss_sig', '-CAfile', oldRoot, newWithOld]);
    assert.ok(nwo.ok, nwo.out);
    const own = verify(['-check_ss_sig', '-CAfile', newRoot, oldWithNew]);
    assert.ok(own.ok, own.out);
    // And not the other way round.
    assert.equal(verify(['-CAfile', newRoot, newWithOld]).ok, false);
    assert.equal(verify(['-CAfile', oldRoot, oldWithNew]).ok, false);
    // The new root is self-signed, 25 years, with its own subject.
    const text = execFileSync('openssl', ['x509', '-in', newRoot, '-noout', '-subject', '-issuer', '-dates'], { encoding: 'utf8' });
    assert.match(text, /subject=CN ?= ?Interop Org Root CA 2, O ?= ?Interop Org/);
    assert.match(text, /issuer=CN ?= ?Interop Org Root CA 2, O ?= ?Interop Org/);
    const self = verify(['-check_ss_sig', '-CAfile', newRoot, newRoot]);
    assert.ok(self.ok, self.out);
    const years = (parseCertificate(Buffer.from(decodePemBlocks(readFileSync(newRoot, 'utf8'), 1 << 16)[0]!.der)).notAfter.getFullYear()) - new Date().getFullYear();
    assert.ok(years >= 24 && years <= 25, String(years));
  });

  test('a device certificate issued before the rollover: old root alone, or new root + OldWithNew', () => {
    const old = verify(['-CAfile', oldRoot, '-untrusted', t.intermediatePem, device1]);
    assert.ok(old.ok, old.out);
    const viaLink = verify(['-CAfile', newRoot, '-untrusted', oldWithNew, '-untrusted', t.intermediatePem, device1]);
    assert.ok(viaLink.ok, viaLink.out);
    const noLink = verify(['-CAfile', newRoot, '-untrusted', t.intermediatePem, device1]);
    assert.equal(noLink.ok, false, noLink.out);
  });

  test('install-rollover; ca list shows both roots; an intermediate signed after it chains to the new root (and to the old via NewWithOld)', () => {
    ok(['root', 'install-rollover', '--home', t.home, '--from', t.rootDir]);
    const cas = JSON.parse(ok(['ca', 'list', '--home', t.home, '--json'])) as { name: string; role: string; status: string }[];
    assert.deepEqual(cas.filter((c) => c.role === 'root').map((c) => `${c.name}:${c.status}`), ['root:active', 'root-2:active']);
    assert.equal(ok(['ca', 'export', '--home', t.home]), readFileSync(newRoot, 'utf8'));
    const list = ok(['ca', 'list', '--home', t.home]);
    assert.match(list, /root-2\s+root\s+active/);

    ok(['ca', 'request', '--home', t.home, '--name', 'line-b', '--out', join(dir, 'line-b.csr')]);
    ok(['root', 'sign', '--root-dir', t.rootDir, '--csr', join(dir, 'line-b.csr'), '--out', join(dir, 'line-b.pem')]);
    ok(['ca', 'install', '--home', t.home, '--cert', join(dir, 'line-b.pem')]);
    const lineB = verify(['-CAfile', newRoot, join(dir, 'line-b.pem')]);
    assert.ok(lineB.ok, lineB.out);
    const device2 = join(dir, 'device-2.pem');
    ok(['issue', '--home', t.home, '--ca', 'line-b', '--csr', newCsr(dir, 'device-2'), '--subject', 'CN=device-2', '--out', device2]);
    const v2 = verify(['-CAfile', newRoot, '-untrusted', join(dir, 'line-b.pem'), device2]);
    assert.ok(v2.ok, v2.out);
    const v2old = verify(['-CAfile', oldRoot, '-untrusted', newWithOld, '-untrusted', join(dir, 'line-b.pem'), device2]);
    assert.ok(v2old.ok, v2old.out);
  });

  test('EST cacerts over HTTPS: the issuing CAs with NewWithNew, NewWithOld, OldWithNew and OldWithOld', async () => {
    const authority = await Authority.open(t.home, t.passphrase);
    let servers: RunningServers | undefined;
    try {
      servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream) });
      const b64 = join(dir, 'cacerts.b64');
      await run('curl', ['--silent', '--show-error', '--fail-with-body', '--cacert', t.rootPem, '-o', b64, `${servers.httpsUrl}/.well-known/est/cacerts`], { timeout: 30_000 });
      const der = Buffer.from(readFileSync(b64, 'utf8'), 'base64');
      const certs = decodeCertsOnly(der);
      const pem = (f: string) => Buffer.from(decodePemBlocks(readFileSync(f, 'utf8'), 1 << 16)[0]!.der);
      const tail = certs.slice(-4);
      assert.deepEqual(tail.map((c) => [c.equals(pem(newRoot)), c.equals(pem(newWithOld)), c.equals(pem(oldWithNew)), c.equals(pem(oldRoot))].indexOf(true)), [0, 1, 2, 3]);
      assert.deepEqual(certs.slice(0, -4).map((c) => nameToString(parseCertificate(c).subject)).sort(), ['CN=Interop Org issuing-1, O=Interop Org', 'CN=Interop Org line-b, O=Interop Org']);
      const p7 = join(dir, 'cacerts.p7');
      writeFileSync(p7, der);
      const printed = execFileSync('openssl', ['pkcs7', '-inform', 'DER', '-in', p7, '-print_certs'], { encoding: 'utf8' });
      assert.equal((printed.match(/BEGIN CERTIFICATE/g) ?? []).length, certs.length);
      // Two certificates with the new root's subject (NewWithNew, NewWithOld), two with the old one's (OldWithNew, OldWithOld).
      assert.equal((printed.match(/subject=CN ?= ?Interop Org Root CA 2, O ?= ?Interop Org/g) ?? []).length, 2);
      assert.equal((printed.match(/subject=CN ?= ?Interop Org Root CA, O ?= ?Interop Org/g) ?? []).length, 2);
      assert.equal((printed.match(/issuer=CN ?= ?Interop Org Root CA, O ?= ?Interop Org/g) ?? []).length, 3); // OldWithOld, NewWithOld, issuing-1
    } finally {
      await servers?.close();
      await authority.close();
    }
  });

  test('root revoke: the root CRL lists issuing-1 with its reason; openssl -crl_check rejects it; install-crl revokes what it issued', () => {
    const res = JSON.parse(ok(['root', 'revoke', '--root-dir', t.rootDir, '--ca', 'issuing-1', '--reason', 'keyCompromise'])) as { root: string; crl: string; crlPem: string; serial: string };
    assert.equal(res.root, 'root');
    const text = execFileSync('openssl', ['crl', '-inform', 'DER', '-in', res.crl, '-noout', '-text'], { encoding: 'utf8' });
    assert.match(text, /Issuer: CN ?= ?Interop Org Root CA, O ?= ?Interop Org/);
    assert.match(text, new RegExp(`Serial Number: 0?${res.serial.toUpperCase()}`));
    assert.match(text, /X509v3 CRL Reason Code:\s*\n\s*Key Compromise/);
    assert.match(text, /X509v3 CRL Number:\s*\n\s*1\b/);
    const crlVerify = spawnSync('openssl', ['crl', '-inform', 'DER', '-in', res.crl, '-noout', '-CAfile', oldRoot], { encoding: 'utf8' });
    assert.match(`${crlVerify.stdout}${crlVerify.stderr}`, /verify OK/);

    const bundle = join(dir, 'root-with-crl.pem');
    writeFileSync(bundle, readFileSync(oldRoot, 'utf8') + readFileSync(res.crlPem, 'utf8'));
    const revoked = verify(['-crl_check', '-CAfile', bundle, t.intermediatePem]);
    assert.equal(revoked.ok, false);
    assert.match(revoked.out, /certificate revoked/);
    // The new-root intermediate is not on the old root's CRL, and root-2 has no CRL yet: line-b still verifies with -crl_check against root-2's fresh CRL.
    const fresh = JSON.parse(ok(['root', 'crl', '--root-dir', t.rootDir, '--root', 'root-2'])) as { crlPem: string }[];
    const bundle2 = join(dir, 'root2-with-crl.pem');
    writeFileSync(bundle2, readFileSync(newRoot, 'utf8') + readFileSync(fresh[0]!.crlPem, 'utf8'));
    const lineB = verify(['-crl_check', '-CAfile', bundle2, join(dir, 'line-b.pem')]);
    assert.ok(lineB.ok, lineB.out);

    const out = ok(['root', 'install-crl', '--home', t.home, '--crl', res.crl]);
    assert.match(out, /issuing-1 .*revoked; [1-9]\d* certificates revoked/);
    assert.ok(readFileSync(join(t.home, 'crl', 'root.crl')).equals(readFileSync(res.crl)));
    const cas = JSON.parse(ok(['ca', 'list', '--home', t.home, '--json'])) as { name: string; status: string }[];
    assert.equal(cas.find((c) => c.name === 'issuing-1')!.status, 'revoked');
    assert.equal(cas.find((c) => c.name === 'line-b')!.status, 'active');
    const audit = ok(['audit', 'list', '--home', t.home]);
    assert.match(audit, /certificate\.revoke\s.*"issuer":"issuing-1","reason":"cACompromise"/);
    assert.match(audit, /crl\.install\s+root/);
  });
});

const hsmSkip = !softHsmAvailable() && process.env.CI !== 'true' ? 'softhsm2 not installed: apt-get install softhsm2' : false;

describe('root rollover with the root key in SoftHSM2 (PKCS#11)', { skip: hsmSkip }, () => {
  let dir: string;
  let rootToken: SoftHsmToken;
  let ok: (args: string[]) => string;

  before(async () => {
    assert.ok(softHsmAvailable(), 'softhsm2 is required under CI=true (apt-get install softhsm2)');
    const { mkdtemp } = await import('node:fs/promises');
    const { tmpdir } = await import('node:os');
    dir = await mkdtemp(join(tmpdir(), 'hallmark-rollover-hsm-'));
    rootToken = await createSoftHsmToken('hallmark-rollover-root');
    ok = cli({ ...rootToken.env, HALLMARK_PASSPHRASE: 'rollover hsm passphrase', HALLMARK_PKCS11_PIN: rootToken.pin, HALLMARK_ROOT_PKCS11_PIN: rootToken.pin, HALLMARK_DATABASE_URL: '' });
  });

  after(async () => {
    await rootToken?.cleanup();
    if (dir) (await import('node:fs')).rmSync(dir, { recursive: true, force: true });
  });

  test('the new root key is made in the token; the link certificates verify; revoke + install-crl work', () => {
    const home = join(dir, 'home');
    const rootDir = join(dir, 'root');
    ok(['init', '--home', home, '--root-dir', rootDir, '--org', 'HSM Org', '--key-backend', 'pkcs11', '--pkcs11-module', rootToken.module, '--pkcs11-token', rootToken.token, '--root-pkcs11-token', rootToken.token]);
    ok(['root', 'rollover', '--root-dir', rootDir, '--key-algorithm', 'ecdsa-p384']);
    const config = JSON.parse(readFileSync(join(rootDir, 'root.json'), 'utf8')) as { keyRef: { backend: string }; previous: { keyRef: { backend: string } }[] };
    assert.equal(config.keyRef.backend, 'pkcs11');
    assert.equal(config.previous[0]!.keyRef.backend, 'pkcs11');
    const nwo = verify(['-check_ss_sig', '-CAfile', join(rootDir, 'root-1.pem'), join(rootDir, 'root-2-newwithold.pem')]);
    assert.ok(nwo.ok, nwo.out);
    const own = verify(['-check_ss_sig', '-CAfile', join(rootDir, 'root-2.pem'), join(rootDir, 'root-2-oldwithnew.pem')]);
    assert.ok(own.ok, own.out);
    assert.match(execFileSync('openssl', ['x509', '-in', join(rootDir, 'root-2.pem'), '-noout', '-text'], { encoding: 'utf8' }), /Public-Key: \(384 bit\)/);
    // No key material on disk.
    for (const f of ['root.json', 'root-2.pem', 'issued.jsonl']) assert.ok(!readFileSync(join(rootDir, f), 'utf8').includes('PRIVATE KEY'));
    ok(['root', 'install-rollover', '--home', home, '--from', rootDir]);
    const res = JSON.parse(ok(['root', 'revoke', '--root-dir', rootDir, '--ca', 'issuing-1'])) as { crl: string };
    const crlOk = spawnSync('openssl', ['crl', '-inform', 'DER', '-in', res.crl, '-noout', '-CAfile', join(rootDir, 'root-1.pem')], { encoding: 'utf8' });
    assert.match(`${crlOk.stdout}${crlOk.stderr}`, /verify OK/);
    ok(['root', 'install-crl', '--home', home, '--crl', res.crl]);
    const cas = JSON.parse(ok(['ca', 'list', '--home', home, '--json'])) as { name: string; status: string }[];
    assert.deepEqual(cas.map((c) => `${c.name}:${c.status}`), ['root:active', 'issuing-1:revoked', 'root-2:active']);
  });
});
