// One set of migrations for SQLite and PostgreSQL. Only the column types that differ are chosen
// per dialect (auto-increment keys and binary columns).

import { sql, type Kysely, type Migration, type MigrationProvider } from 'kysely';
import type { Dialect } from './database.js';

function migrations(dialect: Dialect): Record<string, Migration> {
  const binary = dialect === 'postgres' ? 'bytea' : 'blob';
  const autoId = (db: Kysely<unknown>, table: string) =>
    dialect === 'postgres'
      ? db.schema.createTable(table).addColumn('id', 'serial', (c) => c.primaryKey())
      : db.schema.createTable(table).addColumn('id', 'integer', (c) => c.primaryKey().autoIncrement());
  return {
    '0001_foundation': {
      async up(db: Kysely<unknown>) {
        await autoId(db, 'certificate_authorities')
          .addColumn('name', 'text', (c) => c.notNull().unique())
          .addColumn('role', 'text', (c) => c.notNull().check(sql`role in ('root', 'intermediate')`))
          .addColumn('parent_id', 'integer', (c) => c.references('certificate_authorities.id'))
          .addColumn('status', 'text', (c) => c.notNull().check(sql`status in ('pending', 'active', 'retired', 'revoked')`))
          .addColumn('subject', 'text', (c) => c.notNull())
          .addColumn('key_ref', 'text')
          .addColumn('key_algorithm', 'text', (c) => c.notNull())
          .addColumn('ski', 'text', (c) => c.notNull())
          .addColumn('path_len', 'integer')
          .addColumn('certificate_der', binary)
          .addColumn('csr_der', binary)
          .addColumn('serial', 'text')
          .addColumn('not_before', 'text')
          .addColumn('not_after', 'text')
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'text', (c) => c.notNull())
          .execute();

        await autoId(db, 'certificates')
          .addColumn('issuer_id', 'integer', (c) => c.notNull().references('certificate_authorities.id'))
          .addColumn('serial', 'text', (c) => c.notNull())
          .addColumn('profile', 'text', (c) => c.notNull())
          .addColumn('subject', 'text', (c) => c.notNull())
          .addColumn('fingerprint_sha256', 'text', (c) => c.notNull())
          .addColumn('not_before', 'text', (c) => c.notNull())
          .addColumn('not_after', 'text', (c) => c.notNull())
          .addColumn('der', binary, (c) => c.notNull())
          .addColumn('status', 'text', (c) => c.notNull().check(sql`status in ('valid', 'revoked')`))
          .addColumn('revoked_at', 'text')
          .addColumn('revocation_reason', 'text')
          .addColumn('requested_by', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          // Serial numbers are unique per issuer by constraint, not by hope.
          .addUniqueConstraint('certificates_issuer_serial_unique', ['issuer_id', 'serial'])
          .execute();
        await db.schema.createIndex('certificates_not_after').on('certificates').column('not_after').execute();
        await db.schema.createIndex('certificates_serial').on('certificates').column('serial').execute();

        await db.schema.createTable('audit_log')
          .addColumn('seq', 'integer', (c) => c.primaryKey())
          .addColumn('at', 'text', (c) => c.notNull())
          .addColumn('actor', 'text', (c) => c.notNull())
          .addColumn('action', 'text', (c) => c.notNull())
          .addColumn('target', 'text', (c) => c.notNull())
          .addColumn('details', 'text', (c) => c.notNull())
          .addColumn('prev_hash', 'text', (c) => c.notNull())
          .addColumn('hash', 'text', (c) => c.notNull())
          .execute();

        await db.schema.createTable('api_tokens')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('name', 'text', (c) => c.notNull())
          .addColumn('scopes', 'text', (c) => c.notNull())
          .addColumn('secret_hash', 'text', (c) => c.notNull())
          .addColumn('created_by', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('expires_at', 'text')
          .addColumn('revoked_at', 'text')
          .addColumn('last_used_at', 'text')
          .execute();
      },
      async down(db: Kysely<unknown>) {
        for (const t of ['api_tokens', 'audit_log', 'certificates', 'certificate_authorities']) await db.schema.dropTable(t).execute();
      },
    },
  };
}

export class StaticMigrationProvider implements MigrationProvider {
  readonly #dialect: Dialect;
  constructor(dialect: Dialect) { this.#dialect = dialect; }
  async getMigrations(): Promise<Record<string, Migration>> { return migrations(this.#dialect); }
}
