-- The state database as the schema-3 release (SQLAlchemy ORM, 2026-12-06, b8011a2) created it:
-- sqlite_master of a new database, sorted by type and name.  tests/test_waves_and_store.py pins it.
CREATE INDEX ix_change_layer_id ON change (layer_id);
CREATE INDEX ix_changed_dir_layer_id ON changed_dir (layer_id);
CREATE INDEX ix_layer_seq ON layer (seq);
CREATE INDEX ix_layer_state ON layer (state);
CREATE INDEX ix_whiteout_dir_layer_id ON whiteout_dir (layer_id);
CREATE TABLE change (
	id INTEGER NOT NULL, 
	layer_id VARCHAR(200) NOT NULL, 
	seq INTEGER NOT NULL, 
	dir BLOB NOT NULL, 
	name BLOB, 
	action VARCHAR(16) NOT NULL, 
	target BLOB, 
	stash VARCHAR(20), 
	kind INTEGER NOT NULL, 
	mode INTEGER NOT NULL, 
	uid INTEGER NOT NULL, 
	gid INTEGER NOT NULL, 
	atime_ns INTEGER NOT NULL, 
	mtime_ns INTEGER NOT NULL, 
	xattr_before BLOB, 
	xattrs BLOB, 
	PRIMARY KEY (id), 
	FOREIGN KEY(layer_id) REFERENCES layer (id)
);
CREATE TABLE changed_dir (
	id INTEGER NOT NULL, 
	layer_id VARCHAR(200) NOT NULL, 
	dir BLOB NOT NULL, 
	atime_ns INTEGER NOT NULL, 
	mtime_ns INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(layer_id) REFERENCES layer (id)
);
CREATE TABLE container (
	id VARCHAR(200) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	original BLOB, 
	mode INTEGER NOT NULL, 
	uid INTEGER NOT NULL, 
	gid INTEGER NOT NULL, 
	atime_ns INTEGER NOT NULL, 
	mtime_ns INTEGER NOT NULL, 
	note TEXT, 
	PRIMARY KEY (id)
);
CREATE TABLE finding (
	id INTEGER NOT NULL, 
	layer_id VARCHAR(200), 
	kind VARCHAR(40) NOT NULL, 
	detail TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(layer_id) REFERENCES layer (id)
);
CREATE TABLE layer (
	id VARCHAR(200) NOT NULL, 
	seq INTEGER NOT NULL, 
	parent VARCHAR(200), 
	ancestors TEXT NOT NULL, 
	link_id VARCHAR(26) NOT NULL, 
	has_child BOOLEAN NOT NULL, 
	writable BOOLEAN NOT NULL, 
	state VARCHAR(32) NOT NULL, 
	atime_ns INTEGER NOT NULL, 
	mtime_ns INTEGER NOT NULL, 
	entries INTEGER NOT NULL, 
	error TEXT, 
	proof_dirs BLOB, 
	proof VARCHAR(64), 
	PRIMARY KEY (id), 
	UNIQUE (link_id)
);
CREATE TABLE run (
	id INTEGER NOT NULL, 
	schema_version INTEGER NOT NULL, 
	phase VARCHAR(32) NOT NULL, 
	strategy VARCHAR(16) NOT NULL, 
	root TEXT NOT NULL, 
	created_at VARCHAR(40) NOT NULL, 
	updated_at VARCHAR(40) NOT NULL, 
	image_staged BOOLEAN NOT NULL, 
	rollback_from VARCHAR(32), 
	last_error TEXT, 
	cutover_seconds DOUBLE, 
	PRIMARY KEY (id)
);
CREATE TABLE saved_time (
	path TEXT NOT NULL, 
	atime_ns INTEGER NOT NULL, 
	mtime_ns INTEGER NOT NULL, 
	PRIMARY KEY (path)
);
CREATE TABLE whiteout_dir (
	id INTEGER NOT NULL, 
	layer_id VARCHAR(200) NOT NULL, 
	path BLOB NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(layer_id) REFERENCES layer (id)
);
