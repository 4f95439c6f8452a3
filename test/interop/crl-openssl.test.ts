// CRLs checked by openssl: `openssl crl -text` shows the revoked serials, reasons and numbers;
// `openssl verify -crl_check` refuses a revoked device certificate and accepts another; with
// `-use_deltas` a revocation only in the delta CRL is found too. And `hallmark crl show` end to end.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Authority, type IssuedCertificate } from '../../src/authority/authority.js';
import { CrlPublisher } from '../../src/authority/crl-publisher.js';
import { encodePem } from '../../src/pki/pem.js';
import { parseCrl } from '../../src/protocols/crl/crl.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { openssl } from '../pki/fixtures.js';
import { ACTOR, issueDevices } from '../protocols/crl/setup.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');

/** `openssl verify` output, stdout and stderr together, whatever its exit status. */
function verify(args: string[]): { ok: boolean; text: string } {
  const r = spawnSync('openssl', ['verify', ...args], { encoding: 'utf8' });
  return { ok: r.status === 0, text: `${r.stdout}${r.stderr}` };
}

describe('CRLs with openssl', () => {
  let t: TestAuthority;
  let authority: Authority;
  let publisher: CrlPublisher;
  let certs: IssuedCertificate[];
  const file = (name: string): string => join(t.dir, name);
  const serialUpper = (s: string): string => s.toUpperCase();

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    publisher = new CrlPublisher(authority, { checkEveryMs: 0, publicUrl: 'http://pki.test' });
    ({ certs } = await issueDevices(authority, 4));
    certs.forEach((c, i) => writeFileSync(file(`device-${i}.pem`), encodePem('CERTIFICATE', c.der)));
  });

  after(async () => {
    await publisher.stop();
    await authority.close();
    await t.cleanup();
  });

  test('openssl crl -text shows the revoked serials with reasons and the CRL number; verify -crl_check refuses the revoked, accepts the others', async () => {
    await authority.revoke({ serial: certs[0]!.serial }, 'keyCompromise', ACTOR);
    await authority.revoke({ serial: certs[1]!.serial }, 'superseded', ACTOR);
    const { full } = await publisher.regenerate('issuing-1');
    writeFileSync(file('full.crl'), full.der);
    writeFileSync(file('full.pem'), encodePem('X509 CRL', full.der));
    const text = openssl(['crl', '-inform', 'DER', '-in', file('full.crl'), '-noout', '-text']).stdout.toString();
    assert.match(text, new RegExp(`X509v3 CRL Number:\\s+${full.number}\\n`));
    assert.match(text, new RegExp(`Serial Number: ${serialUpper(certs[0]!.serial)}\\s+Revocation Date: .*\\s+CRL entry extensions:\\s+X509v3 CRL Reason Code:\\s+Key Compromise`));
    assert.match(text, new RegExp(`Serial Number: ${serialUpper(certs[1]!.serial)}\\s+Revocation Date: .*\\s+CRL entry extensions:\\s+X509v3 CRL Reason Code:\\s+Superseded`));
    assert.doesNotMatch(text, new RegExp(serialUpper(certs[2]!.serial)));
    // openssl checks the CRL signature against issuing-1 too.
    assert.match(openssl(['crl', '-in', file('full.pem'), '-CAfile', t.intermediatePem, '-noout']).stderr, /verify OK/);
    const revoked = verify(['-crl_check', '-CRLfile', file('full.pem'), '-CAfile', t.rootPem, '-untrusted', t.intermediatePem, file('device-0.pem')]);
    assert.equal(revoked.ok, false);
    assert.match(revoked.text, /certificate revoked/);
    const good = verify(['-crl_check', '-CRLfile', file('full.pem'), '-CAfile', t.rootPem, '-untrusted', t.intermediatePem, file('device-2.pem')]);
    assert.ok(good.ok, good.text);
    assert.match(good.text, /device-2\.pem: OK/);
  });

  test('a revocation only in the delta CRL: openssl shows the critical Delta CRL Indicator and, with -use_deltas, refuses the certificate', async () => {
    await authority.revoke({ serial: certs[3]!.serial }, 'keyCompromise', ACTOR);
    const full = await publisher.current('issuing-1', 'full');
    const delta = await publisher.current('issuing-1', 'delta');
    assert.equal(delta.baseNumber, full.number);
    writeFileSync(file('full.pem'), encodePem('X509 CRL', full.der));
    writeFileSync(file('delta.pem'), encodePem('X509 CRL', delta.der));
    const text = openssl(['crl', '-in', file('delta.pem'), '-noout', '-text']).stdout.toString();
    assert.match(text, new RegExp(`X509v3 Delta CRL Indicator: critical\\s+${full.number}\\n`));
    assert.match(text, new RegExp(`X509v3 CRL Number:\\s+${delta.number}\\n`));
    assert.match(text, new RegExp(`Serial Number: ${serialUpper(certs[3]!.serial)}`));
    assert.doesNotMatch(text, new RegExp(serialUpper(certs[0]!.serial)), 'what the base lists is not repeated');
    const base = ['-crl_check', '-CAfile', t.rootPem, '-untrusted', t.intermediatePem];
    const fullOnly = verify([...base, '-CRLfile', file('full.pem'), file('device-3.pem')]);
    assert.ok(fullOnly.ok, `the full CRL alone does not know yet: ${fullOnly.text}`);
    const withDelta = verify([...base, '-use_deltas', '-CRLfile', file('full.pem'), '-CRLfile', file('delta.pem'), file('device-3.pem')]);
    assert.equal(withDelta.ok, false, withDelta.text);
    assert.match(withDelta.text, /certificate revoked/);
    const stillGood = verify([...base, '-use_deltas', '-CRLfile', file('full.pem'), '-CRLfile', file('delta.pem'), file('device-2.pem')]);
    assert.ok(stillGood.ok, stillGood.text);
  });

  test('hallmark crl show: summary (text and JSON), the CRL written as DER or PEM', async () => {
    const env = { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' };
    const run = (args: string[]) => spawnSync(process.execPath, [BIN, 'crl', 'show', '--home', t.home, ...args], { encoding: 'utf8', env, timeout: 60_000 });
    const latest = await publisher.current('issuing-1', 'full');
    const shown = run(['--ca', 'issuing-1', '--json', '--out', file('cli.crl')]);
    assert.equal(shown.status, 0, shown.stderr);
    const summary = JSON.parse(shown.stdout) as { number: number; kind: string; thisUpdate: string; nextUpdate: string; entries: { serial: string; reason: string }[] };
    assert.equal(summary.number, latest.number, 'the stored current CRL, not a new one');
    assert.equal(summary.kind, 'full');
    assert.deepEqual(summary.entries.map((e) => [e.serial, e.reason]).sort(), [[certs[0]!.serial, 'keyCompromise'], [certs[1]!.serial, 'superseded']].sort(), 'device-3 is in the delta only');
    assert.match(openssl(['crl', '-inform', 'DER', '-in', file('cli.crl'), '-noout', '-crlnumber']).stdout.toString(), new RegExp(`crlNumber=(0x)?0*${latest.number.toString(16)}\\n`, 'i'));
    const text = run(['--ca', 'issuing-1', '--delta']);
    assert.equal(text.status, 0, text.stderr);
    assert.match(text.stdout, /Delta CRL of issuing-1: number \d+ \(delta of \d+\)\nthisUpdate: .*\nnextUpdate: .*\nentries: {4}\d+/);
    const pem = run(['--ca', 'issuing-1', '--pem']);
    assert.match(pem.stdout, /^-----BEGIN X509 CRL-----/);
    assert.equal(parseCrl(Buffer.from(pem.stdout.split('\n').slice(1, -2).join(''), 'base64')).number, latest.number);
    const bad = run(['--ca', 'nope']);
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /CA_NOT_FOUND/);
    assert.equal(run([]).status, 2, '--ca is required');
  });
});
