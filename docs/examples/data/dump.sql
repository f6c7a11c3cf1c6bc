CREATE TABLE [Song] ([SongId] INTEGER NOT NULL, [Name] NVARCHAR(200) NOT NULL, [Composer] NVARCHAR(220));
INSERT INTO [Song] ([SongId], [Name], [Composer]) VALUES (1, 'Yesterday', 'Paul McCartney'), (2, 'Imagine', 'John Lennon');
INSERT INTO [Song] ([SongId], [Name], [Composer]) VALUES (3, 'Don''t Stop Me Now', 'Freddie Mercury');
