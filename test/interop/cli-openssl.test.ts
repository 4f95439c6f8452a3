// The `hallmark` command end to end, checked by independent programs: openssl and certtool (GnuTLS).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import BetterSqlite3 from 'better-sqlite3';

const execFileAsync = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const PASSPHRASE = 'cli test passphrase';

interface Result { code: number; stdout: string; stderr: string }

function hallmark(args: string[], env: Record<string, string | undefined> = {}): Result {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    encoding: 'utf8',
    env: { ...process.env, HALLMARK_PASSPHRASE: PASSPHRASE, HALLMARK_DATABASE_URL: '', ...env },
    timeout: 60000,
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function ok(args: string[], env: Record<string, string | undefined> = {}): Result {
  const r = hallmark(args, env);
  assert.equal(r.code, 0, `hallmark ${args.join(' ')} failed: ${r.stderr}`);
  return r;
}

function filesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...filesUnder(p)); else out.push(p);
  }
  return out;
}

const haveCerttool = spawnSync('certtool', ['--version']).status === 0;

describe('hallmark CLI with openssl', () => {
  let dir: string;
  let home: string;
  let rootDir: string;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'hallmark-cli-'));
    home = join(dir, 'home');
    rootDir = join(dir, 'offline-root');
    ok(['init', '--home', home, '--root-dir', rootDir, '--org', 'Acme Devices']);
    writeFileSync(join(dir, 'root.pem'), ok(['ca', 'export', '--home', home]).stdout);
    writeFileSync(join(dir, 'intermediate.pem'), ok(['ca', 'export', '--home', home, '--name', 'issuing-1']).stdout);
  });

  after(() => rmSync(dir, { recursive: true, force: true }));

  test('every subcommand has --help', () => {
    const overview = ok(['--help']).stdout;
    const names = [...overview.matchAll(/^ {2}([a-z]+(?: [a-z]+)?) {2,}/gm)].map((m) => m[1]!.trim());
    assert.ok(names.length >= 12, overview);
    for (const name of names) {
      const r = ok([...name.split(' '), '--help']);
      assert.match(r.stdout, /Usage: hallmark /, name);
    }
  });

  test('openssl verify accepts a certificate from hallmark issue, and x509 -text shows the device profile', () => {
    execFileSync('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'dev.key'), '-subj', '/CN=sensor-0001/O=Somebody Else', '-out', join(dir, 'dev.csr')], { stdio: 'ignore' });
    ok(['issue', '--home', home, '--csr', join(dir, 'dev.csr'), '--subject', 'CN=sensor-0001,O=Acme Devices', '--uri', 'urn:acme:sensor:0001', '--out', join(dir, 'device.pem')]);
    const verify = execFileSync('openssl', ['verify', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'intermediate.pem'), join(dir, 'device.pem')], { encoding: 'utf8' });
    assert.match(verify, /device\.pem: OK/);
    const text = execFileSync('openssl', ['x509', '-in', join(dir, 'device.pem'), '-noout', '-text'], { encoding: 'utf8' });
    assert.match(text, /Subject: CN = sensor-0001, O = Acme Devices/);
    assert.match(text, /X509v3 Basic Constraints: critical\s+CA:FALSE/);
    assert.match(text, /X509v3 Key Usage: critical\s+Digital Signature\n/);
    assert.match(text, /X509v3 Extended Key Usage: \s*\n\s+TLS Web Client Authentication/);
    assert.match(text, /X509v3 Subject Key Identifier/);
    assert.match(text, /X509v3 Authority Key Identifier/);
    assert.match(text, /URI:urn:acme:sensor:0001/);
    // The device key signs a TLS handshake-style challenge that verifies with the certificate.
    execFileSync('openssl', ['verify', '-purpose', 'sslclient', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'intermediate.pem'), join(dir, 'device.pem')]);
  });

  test('certtool (GnuTLS) verifies the chain too', { skip: !haveCerttool && process.env.CI !== 'true' ? 'certtool not installed (apt-get install gnutls-bin)' : false }, () => {
    const chain = readFileSync(join(dir, 'device.pem'), 'utf8') + readFileSync(join(dir, 'intermediate.pem'), 'utf8');
    writeFileSync(join(dir, 'chain.pem'), chain);
    const r = spawnSync('certtool', ['--verify', '--load-ca-certificate', join(dir, 'root.pem'), '--infile', join(dir, 'chain.pem')], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /Chain verification output: Verified/);
  });

  test('the TLS server certificate is a server certificate for localhost', () => {
    const pem = join(home, 'tls', 'server.pem');
    const r = spawnSync('openssl', ['verify', '-purpose', 'sslserver', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'intermediate.pem'), pem], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr + r.stdout);
    const text = execFileSync('openssl', ['x509', '-in', pem, '-noout', '-ext', 'subjectAltName'], { encoding: 'utf8' });
    assert.match(text, /DNS:localhost/);
    assert.match(text, /IP Address:127\.0\.0\.1/);
  });

  test('no unencrypted private key anywhere under the home or the root directory', () => {
    for (const f of [...filesUnder(home), ...filesUnder(rootDir)]) {
      const content = readFileSync(f);
      assert.ok(!content.includes('PRIVATE KEY'), `${f} holds a PEM private key`);
      // A PKCS#8 EC private key DER would start with this prefix; it must not appear either.
      assert.ok(!content.includes(Buffer.from('308187020100301306072a8648ce3d0201', 'hex')), `${f} holds a DER private key`);
    }
  });

  test('the OCSP signer certificate carries id-pkix-ocsp-nocheck', () => {
    const db = new BetterSqlite3(join(home, 'hallmark.db'), { readonly: true });
    const row = db.prepare("select der from certificates where profile = 'ocsp-signer'").get() as { der: Buffer };
    db.close();
    writeFileSync(join(dir, 'ocsp.der'), row.der);
    const text = execFileSync('openssl', ['x509', '-inform', 'DER', '-in', join(dir, 'ocsp.der'), '-noout', '-text'], { encoding: 'utf8' });
    assert.match(text, /OCSP Signing/);
    assert.match(text, /OCSP No Check/);
  });

  test('offline ceremony: ca request -> root sign -> ca install, then issue under the new CA', () => {
    ok(['ca', 'request', '--home', home, '--name', 'line-a', '--out', join(dir, 'line-a.csr')]);
    const pending = JSON.parse(ok(['ca', 'list', '--home', home, '--json']).stdout) as Array<{ name: string; status: string }>;
    assert.equal(pending.find((c) => c.name === 'line-a')?.status, 'pending');
    // The offline side needs only the root directory: no home, no database.
    ok(['root', 'sign', '--root-dir', rootDir, '--csr', join(dir, 'line-a.csr'), '--path-len', '0', '--days', '1825', '--out', join(dir, 'line-a.pem')], { HALLMARK_HOME: join(dir, 'nowhere') });
    ok(['ca', 'install', '--home', home, '--cert', join(dir, 'line-a.pem')]);
    const cas = JSON.parse(ok(['ca', 'list', '--home', home, '--json']).stdout) as Array<{ name: string; status: string; parent: string }>;
    assert.deepEqual(cas.find((c) => c.name === 'line-a'), { ...cas.find((c) => c.name === 'line-a'), status: 'active', parent: 'root' });
    const journal = readFileSync(join(rootDir, 'issued.jsonl'), 'utf8').trim().split('\n');
    assert.equal(journal.length, 3, 'root, issuing-1 and line-a are in the root journal');
    ok(['issue', '--home', home, '--csr', join(dir, 'dev.csr'), '--ca', 'line-a', '--out', join(dir, 'device-a.pem')]);
    writeFileSync(join(dir, 'line-a-chain.pem'), ok(['ca', 'export', '--home', home, '--name', 'line-a', '--chain']).stdout);
    const r = spawnSync('openssl', ['verify', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'line-a-chain.pem'), join(dir, 'device-a.pem')], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    // Installing the same certificate twice, or a certificate for no pending request, is refused.
    const again = hallmark(['ca', 'install', '--home', home, '--cert', join(dir, 'line-a.pem')]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /CA_CERT_MISMATCH/);
  });

  test('bad input: one line, a stable code, a non-zero exit, nothing changed', () => {
    const auditBefore = ok(['audit', 'verify', '--home', home]).stdout;
    const cases: Array<[string[], RegExp, Record<string, string>?]> = [
      [['issue', '--home', home, '--csr', join(dir, 'root.pem')], /BAD_PEM/],
      [['issue', '--home', home, '--csr', join(dir, 'dev.csr'), '--profile', 'nope'], /UNKNOWN_PROFILE/],
      [['issue', '--home', home, '--csr', join(dir, 'dev.csr')], /BAD_PASSPHRASE/, { HALLMARK_PASSPHRASE: 'wrong passphrase' }],
      [['issue', '--home', home, '--csr', join(dir, 'missing.csr')], /cannot read/],
      [['ca', 'list', '--home', join(dir, 'not-a-home')], /NOT_INITIALISED/],
      [['token', 'create', '--home', home, '--scope', 'superuser'], /BAD_SCOPE/],
      [['token', 'create', '--home', home, '--scope', 'admin', '--ttl', 'forever'], /BAD_DURATION/],
      [['root', 'sign', '--root-dir', home, '--csr', join(dir, 'dev.csr')], /ROOT_DIR_INVALID/],
      [['ca', 'list', '--home', home], /DATABASE_UNAVAILABLE/, { HALLMARK_DATABASE_URL: 'postgres://postgres@127.0.0.1:1/none' }],
      [['init', '--home', home, '--org', 'Again'], /ALREADY_INITIALISED/],
    ];
    for (const [args, pattern, env] of cases) {
      const r = hallmark(args, env);
      assert.notEqual(r.code, 0, args.join(' '));
      assert.match(r.stderr, pattern, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split('\n').length, 1, `one line for ${args.join(' ')}: ${r.stderr}`);
    }
    const truncated = readFileSync(join(dir, 'dev.csr'), 'utf8').split('\n').slice(0, 3).join('\n');
    writeFileSync(join(dir, 'truncated.csr'), truncated);
    assert.match(hallmark(['issue', '--home', home, '--csr', join(dir, 'truncated.csr')]).stderr, /BAD_PEM/);
    assert.equal(ok(['audit', 'verify', '--home', home]).stdout, auditBefore, 'no audit entry was added');
  });

  test('a token is printed once and stored only as a hash', () => {
    const token = ok(['token', 'create', '--home', home, '--scope', 'ca:read,audit:read', '--ttl', '1h']).stdout.trim();
    assert.match(token, /^hm_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$/);
    const db = readFileSync(join(home, 'hallmark.db'));
    const wal = existsSync(join(home, 'hallmark.db-wal')) ? readFileSync(join(home, 'hallmark.db-wal')) : Buffer.alloc(0);
    // The secret is base64url and may itself contain "_": cut after the fixed-length "hm_<16 hex>_" prefix,
    // not at the next underscore (a short fragment of the secret could occur in the database by chance).
    const secret = token.slice('hm_'.length + 16 + 1);
    assert.equal(secret.length, 43);
    assert.ok(!db.includes(secret) && !wal.includes(secret), 'the token secret is not in the database');
    assert.ok(!ok(['token', 'list', '--home', home]).stdout.includes(secret));
  });

  test('audit verify: ok, then editing one byte of one entry makes it fail naming that entry', () => {
    const good = ok(['audit', 'verify', '--home', home]).stdout;
    const m = /^ok, (\d+) entries$/m.exec(good);
    assert.ok(m, good);
    assert.ok(Number(m[1]) >= 8);
    const db = new BetterSqlite3(join(home, 'hallmark.db'));
    const row = db.prepare('select seq, details from audit_log where seq = 4').get() as { seq: number; details: string };
    const changed = row.details.replace(/.$/, (c) => (c === '}' ? ' }' : '}'));
    db.prepare('update audit_log set details = ? where seq = 4').run(changed);
    db.close();
    const bad = hallmark(['audit', 'verify', '--home', home]);
    assert.equal(bad.code, 3);
    assert.match(bad.stdout, /FAILED at entry 4: entry 4 was changed/);
    const db2 = new BetterSqlite3(join(home, 'hallmark.db'));
    db2.prepare('update audit_log set details = ? where seq = 4').run(row.details);
    db2.prepare('delete from audit_log where seq = 6').run();
    db2.close();
    const removed = hallmark(['audit', 'verify', '--home', home]);
    assert.equal(removed.code, 3);
    assert.match(removed.stdout, /FAILED at entry 6: entry 6 is missing/);
  });
});

describe('npm start on a fresh clone', () => {
  test('hallmark serve --dev creates a development authority, says so loudly, and serves /healthz', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'hallmark-dev-'));
    const child = execFile(process.execPath, [BIN, 'serve', '--dev', '--home', join(dir, 'hallmark-data'), '--port', '0', '--http-port', '0'], { env: { ...process.env, HALLMARK_PASSPHRASE: '', HALLMARK_DATABASE_URL: '' } });
    try {
      let log = '';
      child.stderr!.on('data', (d: Buffer) => { log += d.toString(); });
      const url = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`serve did not start: ${log}`)), 30000);
        child.stderr!.on('data', () => {
          const m = /"http":"(http:\/\/[^"]+)"/.exec(log);
          if (m) { clearTimeout(timer); resolve(m[1]!); }
        });
        child.on('exit', (code) => reject(new Error(`serve exited ${code}: ${log}`)));
      });
      assert.match(log, /DEVELOPMENT AUTHORITY/);
      const { stdout } = await execFileAsync('curl', ['-sf', `${url}/healthz`]);
      assert.equal(JSON.parse(stdout).status, 'ok');
      assert.ok(existsSync(join(dir, 'hallmark-data', 'DEVELOPMENT-PASSPHRASE')));
      assert.ok(existsSync(join(dir, 'hallmark-root', 'root.pem')), 'the dev root directory sits beside the home');
    } finally {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
