// The same authority flows with every CA key inside SoftHSM2 (through PKCS#11), as an HSM or a
// YubiKey would hold them: init, issue, ceremony. Checked with openssl and pkcs11-tool.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createSoftHsmToken, softHsmAvailable, type SoftHsmToken } from '../helpers/softhsm.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const PASSPHRASE = 'softhsm flow passphrase';

const available = softHsmAvailable();
const skip = !available && process.env.CI !== 'true' ? 'softhsm2 not installed: apt-get install softhsm2' : false;

function filesUnder(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => (statSync(join(dir, n)).isDirectory() ? filesUnder(join(dir, n)) : [join(dir, n)]));
}

describe('authority with keys in SoftHSM2 (PKCS#11)', { skip }, () => {
  let dir: string;
  let caToken: SoftHsmToken;
  let rootToken: SoftHsmToken;
  let env: Record<string, string>;

  const run = (args: string[], extra: Record<string, string> = {}) => spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, ...env, ...extra }, timeout: 60000 });
  const ok = (args: string[], extra: Record<string, string> = {}) => {
    const r = run(args, extra);
    assert.equal(r.status, 0, `hallmark ${args.join(' ')}: ${r.stderr}`);
    return r;
  };

  before(async () => {
    assert.ok(available, 'softhsm2 is required under CI=true (apt-get install softhsm2)');
    dir = mkdtempSync(join(tmpdir(), 'hallmark-hsm-'));
    caToken = await createSoftHsmToken('hallmark-ca');
    rootToken = await createSoftHsmToken('hallmark-root');
    env = { ...caToken.env, HALLMARK_PASSPHRASE: PASSPHRASE, HALLMARK_PKCS11_PIN: caToken.pin, HALLMARK_ROOT_PKCS11_PIN: rootToken.pin, HALLMARK_DATABASE_URL: '' };
  });

  after(async () => {
    await caToken?.cleanup();
    await rootToken?.cleanup();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('init, issue and the ceremony work with the CA keys and the root key in tokens', () => {
    const home = join(dir, 'home');
    const rootDir = join(dir, 'root');
    ok(['init', '--home', home, '--root-dir', rootDir, '--org', 'HSM Org', '--key-backend', 'pkcs11', '--pkcs11-module', caToken.module, '--pkcs11-token', caToken.token, '--root-pkcs11-token', rootToken.token]);
    const cas = JSON.parse(ok(['ca', 'list', '--home', home, '--json']).stdout) as Array<{ name: string; keyLocation: string }>;
    assert.match(cas.find((c) => c.name === 'issuing-1')!.keyLocation, /^pkcs11:token=hallmark-ca;id=/);
    writeFileSync(join(dir, 'root.pem'), ok(['ca', 'export', '--home', home]).stdout);
    writeFileSync(join(dir, 'int.pem'), ok(['ca', 'export', '--home', home, '--name', 'issuing-1']).stdout);

    execFileSync('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'dev.key'), '-subj', '/CN=hsm-device', '-out', join(dir, 'dev.csr')], { stdio: 'ignore' });
    ok(['issue', '--home', home, '--csr', join(dir, 'dev.csr'), '--out', join(dir, 'dev.pem')]);
    const v = spawnSync('openssl', ['verify', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'int.pem'), join(dir, 'dev.pem')], { encoding: 'utf8' });
    assert.equal(v.status, 0, v.stderr);

    ok(['ca', 'request', '--home', home, '--name', 'line-b', '--key-algorithm', 'ecdsa-p384', '--out', join(dir, 'line-b.csr')]);
    ok(['root', 'sign', '--root-dir', rootDir, '--csr', join(dir, 'line-b.csr'), '--out', join(dir, 'line-b.pem')]);
    ok(['ca', 'install', '--home', home, '--cert', join(dir, 'line-b.pem')]);
    ok(['issue', '--home', home, '--ca', 'line-b', '--csr', join(dir, 'dev.csr'), '--chain', '--out', join(dir, 'dev-b.pem')]);
    const vb = spawnSync('openssl', ['verify', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'dev-b.pem'), join(dir, 'dev-b.pem')], { encoding: 'utf8' });
    assert.equal(vb.status, 0, vb.stderr);
    assert.match(execFileSync('openssl', ['x509', '-in', join(dir, 'line-b.pem'), '-noout', '-text'], { encoding: 'utf8' }), /Public-Key: \(384 bit\)/);

    // No key material on disk: neither the home nor the root directory holds a key file.
    for (const f of [...filesUnder(home), ...filesUnder(rootDir)]) assert.ok(!readFileSync(f).includes('PRIVATE KEY'), f);
    assert.deepEqual(readdirSync(rootDir).sort(), ['issued.jsonl', 'root.json', 'root.pem']);

    // The keys are in the tokens, marked sensitive and not extractable (pkcs11-tool, an independent reader).
    const listing = spawnSync('pkcs11-tool', ['--module', caToken.module, '--token-label', caToken.token, '--login', '--pin', caToken.pin, '--list-objects', '--type', 'privkey'], { encoding: 'utf8', env: { ...process.env, ...env } });
    if (listing.status === 0) {
      assert.match(listing.stdout, /hallmark-ca-issuing-1/);
      assert.match(listing.stdout, /Access:\s+.*sensitive/);
      assert.match(listing.stdout, /never extractable/);
    } else {
      assert.ok(process.env.CI !== 'true', `pkcs11-tool failed under CI: ${listing.stderr}`);
    }

    // A wrong PIN is refused with one clear error.
    const bad = run(['issue', '--home', home, '--csr', join(dir, 'dev.csr')], { HALLMARK_PKCS11_PIN: '999999' });
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /BAD_PASSPHRASE/);
  });
});
