// Factory stamps through the `hallmark` command, checked by independent programs: openssl verifies
// every certificate of a run against the chain and matches each stamp's key; kill -9 in the middle of
// `stamp generate` loses nothing and the same command finishes the run; the encrypted archive is
// opened on the factory side with `hallmark stamp open`.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import { createHash, createPrivateKey, createPublicKey } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const PASSPHRASE = 'stamp cli test passphrase';
const ENV = { ...process.env, HALLMARK_PASSPHRASE: PASSPHRASE, HALLMARK_DATABASE_URL: '', HALLMARK_FACTORY_PASSPHRASE: 'factory passphrase' };

interface Result { code: number; stdout: string; stderr: string }
function hallmark(args: string[]): Result {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: ENV, timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}
function ok(args: string[]): Result {
  const r = hallmark(args);
  assert.equal(r.code, 0, `hallmark ${args.join(' ')} failed: ${r.stdout}${r.stderr}`);
  return r;
}
const openssl = (args: string[]): string => execFileSync('openssl', args, { encoding: 'utf8' });

describe('hallmark stamp (CLI, openssl)', () => {
  let dir: string;
  let home: string;
  const h = (...args: string[]): string[] => [...args, '--home', home];
  const db = (): Database.Database => new Database(join(home, 'hallmark.db'), { readonly: true, fileMustExist: true });

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'hallmark-stamp-cli-'));
    home = join(dir, 'home');
    ok(['init', '--home', home, '--root-dir', join(dir, 'root'), '--org', 'Acme Devices']);
    writeFileSync(join(dir, 'root.pem'), ok(h('ca', 'export')).stdout);
    writeFileSync(join(dir, 'issuing.pem'), ok(h('ca', 'export', '--name', 'issuing-1')).stdout);
    ok(h('product', 'create', 'plug', '--allow-server-keygen'));
    ok(h('line', 'create', 'line-b', '--ca', 'issuing-1'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('openssl verifies every certificate of a run against the chain, and each stamp key is its certificate key', () => {
    const batch = ok(h('batch', 'create', '--product', 'plug', '--line', 'line-b', '--quota', '40')).stdout.trim();
    const out = join(dir, 'run-1');
    const r = ok(h('stamp', 'generate', '--batch', batch, '--count', '25', '--out', out, '--format', 'json,tlv,nvs'));
    assert.match(r.stdout, /25 devices/);
    assert.match(r.stderr, /stamps: 25\/25/, 'plain progress lines when stderr is not a terminal');
    const jsons = readdirSync(out).filter((f) => f.endsWith('.json'));
    assert.equal(jsons.length, 25);
    const certFiles: string[] = [];
    for (const f of jsons) {
      const stamp = JSON.parse(readFileSync(join(out, f), 'utf8')) as Record<string, unknown>;
      const pem = Object.values(stamp).find((v) => typeof v === 'string' && v.startsWith('-----BEGIN CERTIFICATE-----') && !v.includes('-----END CERTIFICATE-----\n-----BEGIN')) as string;
      const keyPem = Object.values(stamp).find((v) => typeof v === 'string' && v.includes('BEGIN PRIVATE KEY')) as string;
      assert.ok(pem && keyPem, `certificate and key in ${f}`);
      const certFile = join(out, `${f}.crt.pem`);
      writeFileSync(certFile, pem);
      certFiles.push(certFile);
      // The certificate's key is the stamp's private key (openssl derives the public key from each).
      const keyFile = join(out, `${f}.key.pem`);
      writeFileSync(keyFile, keyPem, { mode: 0o600 });
      assert.equal(openssl(['pkey', '-in', keyFile, '-pubout']), openssl(['x509', '-in', certFile, '-noout', '-pubkey']));
      // `hallmark stamp inspect` reads every format of the same device.
      const serial = f.replace(/\.json$/, '');
      for (const ext of ['.json', '.tlv.bin', '.nvs.csv']) assert.match(ok(h('stamp', 'inspect', join(out, `${serial}${ext}`))).stdout, new RegExp(serial));
    }
    const verified = openssl(['verify', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'issuing.pem'), ...certFiles]);
    assert.equal(verified.trim().split('\n').filter((l) => l.endsWith(': OK')).length, 25, verified);
    const status = JSON.parse(ok(h('stamp', 'status', '--batch', batch, '--json')).stdout) as { stamped: number; written: number };
    assert.deepEqual([status.stamped, status.written], [25, 25]);
  });

  test('kill -9 in the middle of stamp generate loses nothing; the same command finishes the run', async () => {
    const batch = ok(h('batch', 'create', '--product', 'plug', '--line', 'line-b', '--quota', '3000')).stdout.trim();
    const out = join(dir, 'run-kill');
    const args = [BIN, ...h('stamp', 'generate', '--batch', batch, '--count', '3000', '--out', out, '--format', 'json,tlv')];
    const child = spawn(process.execPath, args, { env: ENV, stdio: 'ignore' });
    // Wait until some stamps are committed, then kill -9 without warning.
    for (let i = 0; i < 600; i++) {
      await new Promise((r) => setTimeout(r, 50));
      let n = 0;
      try { n = readdirSync(out).length; } catch { /* not yet */ }
      if (n > 300) break;
    }
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    {
      const d = db();
      const devices = (d.prepare('select count(*) as n from devices where batch_id = ?').get(batch) as { n: number }).n;
      const withCert = (d.prepare('select count(*) as n from devices v where batch_id = ? and exists (select 1 from certificates c where c.device_udid = v.udid)').get(batch) as { n: number }).n;
      d.close();
      assert.ok(devices > 0 && devices < 3000, `interrupted part way (${devices} devices)`);
      assert.equal(withCert, devices, 'no registered device without its recorded certificate');
    }
    const r = ok(h('stamp', 'generate', '--batch', batch, '--count', '3000', '--out', out, '--format', 'json,tlv'));
    assert.match(r.stdout, /^Finished stamp run/);
    const d = db();
    const devices = d.prepare('select udid, serial_number from devices where batch_id = ?').all(batch) as { udid: string; serial_number: string }[];
    const unwritten = (d.prepare('select count(*) as n from stamps where batch_id = ? and (written_at is null or pending is not null)').get(batch) as { n: number }).n;
    d.close();
    assert.equal(devices.length, 3000);
    assert.equal(unwritten, 0);
    const files = new Set(readdirSync(out));
    for (const dev of devices) {
      assert.ok(files.has(`${dev.serial_number}.json`) && files.has(`${dev.serial_number}.tlv.bin`), `files for ${dev.serial_number}`);
    }
    // Every JSON stamp is complete (none torn by the kill) and its key's SHA-256 is its UDID.
    for (const dev of devices.filter((_, i) => i % 50 === 0)) {
      const stamp = JSON.parse(readFileSync(join(out, `${dev.serial_number}.json`), 'utf8')) as Record<string, string>;
      const keyPem = Object.values(stamp).find((v) => typeof v === 'string' && v.includes('BEGIN PRIVATE KEY'))!;
      const spki = createPublicKey(createPrivateKey(keyPem)).export({ type: 'spki', format: 'der' });
      assert.equal(createHash('sha256').update(spki).digest('hex'), dev.udid);
    }
  });

  test('--encrypt-to: the factory opens the archive with its key; another factory cannot', () => {
    const batch = ok(h('batch', 'create', '--product', 'plug', '--line', 'line-b', '--quota', '20')).stdout.trim();
    const factoryDir = join(dir, 'factory');
    const otherDir = join(dir, 'other-factory');
    ok(['stamp', 'factory-key', '--out', factoryDir]);
    ok(['stamp', 'factory-key', '--out', otherDir]);
    const out = join(dir, 'run-sealed');
    ok(h('stamp', 'generate', '--batch', batch, '--count', '10', '--out', out, '--format', 'tlv', '--encrypt-to', join(factoryDir, 'factory.pem')));
    const archive = readdirSync(out).find((f) => f.endsWith('.hsa'))!;
    assert.ok(archive, 'an archive was written');
    assert.deepEqual(readdirSync(out).filter((f) => f.endsWith('.bin')), []);
    const opened = join(dir, 'opened');
    ok(['stamp', 'open', join(out, archive), '--key', join(factoryDir, 'factory.key'), '--trust', join(dir, 'root.pem'), '--out', opened]);
    const bins = readdirSync(opened).filter((f) => f.endsWith('.bin'));
    assert.equal(bins.length, 10);
    assert.match(ok(['stamp', 'inspect', join(opened, bins[0]!)]).stdout, new RegExp(batch));
    const wrong = hallmark(['stamp', 'open', join(out, archive), '--key', join(otherDir, 'factory.key'), '--trust', join(dir, 'root.pem'), '--out', join(dir, 'opened-wrong')]);
    assert.equal(wrong.code, 1);
    assert.match(wrong.stderr, /STAMP_ARCHIVE_WRONG_KEY/);
  });

  test('kill -9 in the middle of an encrypted run: the same command ships every stamp exactly once, in one archive', async () => {
    const batch = ok(h('batch', 'create', '--product', 'plug', '--line', 'line-b', '--quota', '3000')).stdout.trim();
    const factoryDir = join(dir, 'factory-kill');
    ok(['stamp', 'factory-key', '--out', factoryDir]);
    const out = join(dir, 'run-sealed-kill');
    const command = h('stamp', 'generate', '--batch', batch, '--count', '3000', '--out', out, '--format', 'json', '--encrypt-to', join(factoryDir, 'factory.pem'));
    const child = spawn(process.execPath, [BIN, ...command], { env: ENV, stdio: 'ignore' });
    // Wait until some stamps are committed (the archive is still .partial), then kill -9.
    for (let i = 0; i < 600; i++) {
      await new Promise((r) => setTimeout(r, 50));
      let n = 0;
      try { const d = db(); n = (d.prepare('select count(*) as n from stamps where batch_id = ?').get(batch) as { n: number }).n; d.close(); } catch { /* not yet */ }
      if (n > 300) break;
    }
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    {
      const d = db();
      const made = (d.prepare('select count(*) as n from stamps where batch_id = ?').get(batch) as { n: number }).n;
      d.close();
      assert.ok(made > 0 && made < 3000, `interrupted part way (${made} stamps)`);
    }
    assert.ok(readdirSync(out).every((f) => !f.endsWith('.hsa')), 'no archive in place before the run finished');
    assert.match(ok(command).stdout, /^Finished stamp run/);
    const parts = readdirSync(out).filter((f) => f.endsWith('.hsa') || f.endsWith('.partial'));
    assert.equal(parts.length, 1, `one archive, no torn part: ${parts.join(', ')}`);
    const opened = join(dir, 'opened-kill');
    ok(['stamp', 'open', join(out, parts[0]!), '--key', join(factoryDir, 'factory.key'), '--trust', join(dir, 'root.pem'), '--out', opened]);
    const d = db();
    const serials = (d.prepare('select serial_number from devices where batch_id = ?').all(batch) as { serial_number: string }[]).map((r) => r.serial_number);
    const kept = (d.prepare('select count(*) as n from stamps where batch_id = ? and pending is not null').get(batch) as { n: number }).n;
    d.close();
    assert.equal(serials.length, 3000);
    assert.equal(kept, 0, 'no secret kept once the run is complete');
    assert.deepEqual(readdirSync(opened).filter((f) => f.endsWith('.json')).sort(), serials.map((s) => `${s}.json`).sort());
  });
});
