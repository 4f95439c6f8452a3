import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { initAuthority } from '../../src/authority/init.js';
import { forEachDialect, withDatabaseUrl, type StoreTarget } from '../helpers/db.js';
import { tempDirFor } from '../helpers/tmp.js';

const PASSPHRASE = 'init test passphrase';


forEachDialect('an init that fails half-way leaves no rows, no home and no root directory behind', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  const rootDir = join(target.dir, 'root');
  // The issuing CA name is refused only after the root is made and recorded: a late failure.
  await assert.rejects(withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: 'Half Way', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'test', issuingCaName: 'bad name' })), { code: 'BAD_REQUEST' });
  assert.equal(existsSync(rootDir), false, 'root directory removed');
  if (target.dialect === 'postgres') {
    const store = await target.openStore();
    for (const table of ['certificate_authorities', 'certificates', 'audit_log'] as const) {
      const rows = await store.db.selectFrom(table).selectAll().execute();
      assert.equal(rows.length, 0, `${table} is empty again`);
    }
    // And a correct init on the same database then succeeds.
    await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: 'Second Try', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'test' }));
  } else {
    assert.equal(existsSync(home), false, 'home (and its SQLite file) removed');
  }
  void t;
});

test('bad init input is refused before anything is created', async (t) => {
  const dir = await tempDirFor(t);
  const home = join(dir, 'home');
  const rootDir = join(dir, 'root');
  const base = { home, rootDir, org: 'Acme', passphrase: PASSPHRASE, keyBackend: 'file' as const, actor: 'test' };
  await assert.rejects(initAuthority({ ...base, tlsDnsNames: ['not a host name!'] }), { code: 'BAD_REQUEST' });
  await assert.rejects(initAuthority({ ...base, org: '' }), { code: 'BAD_REQUEST' });
  await assert.rejects(initAuthority({ ...base, org: 'A,B' }), { code: 'BAD_REQUEST' });
  await assert.rejects(initAuthority({ ...base, passphrase: '' }), { code: 'PASSPHRASE_REQUIRED' });
  await assert.rejects(initAuthority({ ...base, passphrase: 'short' }), { code: 'BAD_REQUEST' });
  await assert.rejects(initAuthority({ ...base, algorithm: 'dsa-1024' }), { code: 'UNSUPPORTED_ALGORITHM' });
  await assert.rejects(initAuthority({ ...base, keyBackend: 'pkcs11' }), { code: 'BAD_REQUEST' });
  assert.equal(existsSync(home), false);
  assert.equal(existsSync(rootDir), false);
  // An existing, unrelated home directory is left as it was.
  mkdirSync(home);
  await assert.rejects(initAuthority({ ...base, tlsIpAddresses: ['300.1.1.1'] }), { code: 'BAD_REQUEST' });
  assert.equal(existsSync(home), true);
});
