// CRLs checked by GnuTLS: `certtool --verify --load-crl` refuses a revoked device certificate and
// accepts another, and `openssl verify -crl_check` gives the same two answers on the same files.
// The CRL is the one an operator would fetch: `hallmark crl show --ca issuing-1 --pem --out FILE`.
// Outside CI a missing certtool skips with the reason; under CI=true it fails.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Authority, type IssuedCertificate } from '../../src/authority/authority.js';
import { CrlPublisher } from '../../src/authority/crl-publisher.js';
import { encodePem } from '../../src/pki/pem.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { ACTOR, issueDevices } from '../protocols/crl/setup.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');

const haveCerttool = spawnSync('certtool', ['--version']).status === 0;
const skip = !haveCerttool && process.env.CI !== 'true' ? 'certtool not installed (apt-get install gnutls-bin)' : false;

interface Verdict { ok: boolean; text: string }

/** `certtool --verify` against the root, with the CRL loaded; stdout and stderr together. */
function certtoolVerify(root: string, crl: string, chain: string): Verdict {
  const r = spawnSync('certtool', ['--verify', '--load-ca-certificate', root, '--load-crl', crl, '--infile', chain], { encoding: 'utf8', timeout: 30_000 });
  assert.ok(!r.error, `certtool could not run: ${r.error?.message}${process.env.CI === 'true' ? ' (required under CI=true)' : ''}`);
  return { ok: r.status === 0, text: `${r.stdout}${r.stderr}` };
}

/** `openssl verify -crl_check` of the same device certificate, intermediate and CRL. */
function opensslVerify(root: string, intermediate: string, crl: string, device: string): Verdict {
  const r = spawnSync('openssl', ['verify', '-crl_check', '-CRLfile', crl, '-CAfile', root, '-untrusted', intermediate, device], { encoding: 'utf8', timeout: 30_000 });
  return { ok: r.status === 0, text: `${r.stdout}${r.stderr}` };
}

describe('CRLs with certtool (GnuTLS) and openssl', () => {
  let t: TestAuthority;
  let authority: Authority;
  let publisher: CrlPublisher;
  let certs: IssuedCertificate[];
  const file = (name: string): string => join(t.dir, name);

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    publisher = new CrlPublisher(authority, { checkEveryMs: 0, publicUrl: 'http://pki.test' });
    ({ certs } = await issueDevices(authority, 2));
    const intermediate = readFileSync(t.intermediatePem, 'utf8');
    certs.forEach((c, i) => {
      const pem = encodePem('CERTIFICATE', c.der);
      writeFileSync(file(`device-${i}.pem`), pem);
      writeFileSync(file(`chain-${i}.pem`), pem + intermediate); // device certificate, then issuing-1
    });
  });

  after(async () => {
    await publisher.stop();
    await authority.close();
    await t.cleanup();
  });

  test('certtool --verify --load-crl refuses the revoked certificate (reason: revoked) and verifies the other; openssl verify -crl_check agrees', { skip }, async () => {
    assert.ok(haveCerttool, 'certtool not installed (apt-get install gnutls-bin); required under CI=true');
    await authority.revoke({ serial: certs[0]!.serial }, 'keyCompromise', ACTOR);
    const { full } = await publisher.regenerate('issuing-1');

    // The issuing CA's full CRL as the operator fetches it.
    const env = { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' };
    const shown = spawnSync(process.execPath, [BIN, 'crl', 'show', '--home', t.home, '--ca', 'issuing-1', '--pem', '--out', file('crl.pem')], { encoding: 'utf8', env, timeout: 60_000 });
    assert.equal(shown.status, 0, shown.stderr);
    const crlPem = readFileSync(file('crl.pem'), 'utf8');
    assert.match(crlPem, /^-----BEGIN X509 CRL-----/);
    assert.equal(crlPem, encodePem('X509 CRL', full.der), 'the CRL just published, listing the revocation');

    // certtool itself accepts the CRL's signature under issuing-1.
    const crlCheck = spawnSync('certtool', ['--verify-crl', '--load-ca-certificate', t.intermediatePem, '--infile', file('crl.pem')], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(crlCheck.status, 0, crlCheck.stdout + crlCheck.stderr);
    assert.match(crlCheck.stdout, /Verification output: Verified/);

    // certtool checks the device certificate against this CRL (its number in hex) and says why it fails.
    const checkedAgainst = (verdict: string): RegExp =>
      new RegExp(`Checked against CRL\\[0*${full.number.toString(16)}\\] of: .*CN=Test Org issuing-1\\n\\s*Output: ${verdict}`, 'i');
    const withoutCrl = spawnSync('certtool', ['--verify', '--load-ca-certificate', t.rootPem, '--infile', file('chain-0.pem')], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(withoutCrl.status, 0, `without the CRL the chain is valid: ${withoutCrl.stdout}${withoutCrl.stderr}`);
    const revoked = certtoolVerify(t.rootPem, file('crl.pem'), file('chain-0.pem'));
    assert.equal(revoked.ok, false, revoked.text);
    assert.match(revoked.text, checkedAgainst('Not verified\\. The certificate is NOT trusted\\. The certificate chain is revoked\\.'));
    assert.match(revoked.text, /Chain verification output: Not verified\. The certificate is NOT trusted\. The certificate chain is revoked\./);
    assert.doesNotMatch(revoked.text, /Chain verification output: Verified/);

    const good = certtoolVerify(t.rootPem, file('crl.pem'), file('chain-1.pem'));
    assert.ok(good.ok, good.text);
    assert.match(good.text, checkedAgainst('Verified\\. The certificate is trusted\\.'), 'the CRL was consulted for the good one too');
    assert.match(good.text, /Chain verification output: Verified\. The certificate is trusted\./);

    // openssl, on the same files, gives the same two answers.
    const sslRevoked = opensslVerify(t.rootPem, t.intermediatePem, file('crl.pem'), file('device-0.pem'));
    assert.equal(sslRevoked.ok, false, sslRevoked.text);
    assert.match(sslRevoked.text, /certificate revoked/);
    const sslGood = opensslVerify(t.rootPem, t.intermediatePem, file('crl.pem'), file('device-1.pem'));
    assert.ok(sslGood.ok, sslGood.text);
    assert.match(sslGood.text, /device-1\.pem: OK/);
    assert.equal(revoked.ok, sslRevoked.ok);
    assert.equal(good.ok, sslGood.ok);
  });
});
